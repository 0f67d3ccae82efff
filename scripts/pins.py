"""The test environment's pins (scripts/constraints.txt) against the environment this Python runs in.

    python scripts/pins.py diff scripts/constraints.txt    # each package whose version here differs from its pin
    python scripts/pins.py write scripts/constraints.txt   # pin every package installed here (pissa itself aside)

scripts/setup.sh installs with `pip -c scripts/constraints.txt`, so a fresh machine and CI get the
versions the suite passed with; scripts/check_latest.sh runs `diff` in a venv of the newest releases.
A local version label (torch's "+cpu") is dropped: `torch==2.13.0` matches the CPU and the CUDA builds.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# The exact versions the test suite passed with (scripts/setup.sh installs with `pip -c` this file).
# Users who `pip install` pissa get pyproject.toml's ranges instead. To bump: bash scripts/check_latest.sh --pin
# (a venv of the newest releases; the file is rewritten only when the suite passes there). README: "Pinned versions".
"""
SKIP = {"pissa"}  # the package under test, installed editable


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{normalised name: version without a local label} of every distribution in this environment."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) not in SKIP:
            out[_norm(name)] = dist.version.split("+")[0]
    return out


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[_norm(name)] = version.strip()
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("diff", "write"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    verb, path = argv[0], Path(argv[1])
    here = installed()
    if verb == "write":
        path.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(here.items())))
        print(f"pins: {len(here)} packages -> {path}")
        return 0
    pinned = pins(path)
    rows = [(n, pinned.get(n, "(not pinned)"), here.get(n, "(not installed)"))
            for n in sorted(set(pinned) | set(here)) if pinned.get(n) != here.get(n)]
    for name, pin, now in rows:
        print(f"  {name:28} pin {pin:16} newest {now}")
    print(f"pins: {len(rows)} package(s) differ from {path}" if rows else f"pins: every package matches {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
