"""Build pissa/studies/resources/general_text.jsonl: the held-out general text `pissa compare` measures
forgetting on (mean token loss, and the KL divergence from the base model's next-token
distribution).

SmolLM2's pretraining mix is mostly educational English web text and code. Nothing may be
downloaded, so both halves come from the Python installation that runs this script, under the
Python Software Foundation License (see pissa/studies/resources/README.md):
- English prose: the Python Language Reference and library topics that `help()` shows
  (pydoc_data/topics.py), split into paragraphs;
- Python code: modules of the standard library, chosen for plain, readable pure Python.

Records are {"text", "kind": "prose" | "code", "source"}, about CHUNK characters each, in a fixed
order. The committed file was made with CPython 3.11.7; another version gives a slightly
different file, so regenerate only on purpose.

    python scripts/make_general_text.py [--out pissa/studies/resources/general_text.jsonl]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

CHUNK = 1500
PROSE_TOPICS = 40           # the first 40 topics in sorted order (about 150 KB)
CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "string", "colorsys", "shlex",
                "graphlib", "calendar", "difflib", "fnmatch", "glob", "json.encoder", "json.decoder", "queue",
                "sched", "stat", "tokenize", "dataclasses", "enum", "functools", "operator")
CODE_BUDGET = 160_000


def chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of about `size` characters, cut at paragraph (blank line) boundaries;
    a paragraph longer than `size` is cut at line boundaries."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(cur) + len(para) + 2 > size and cur:
            out.append(cur)
            cur = ""
        while len(para) > size:
            cut = para.rfind("\n", 0, size)
            cut = cut if cut > size // 2 else size
            out.append(para[:cut])
            para = para[cut:].lstrip("\n")
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "pissa/studies/resources/general_text.jsonl"))
    args = p.parse_args()
    import importlib

    import pydoc_data.topics

    records = []
    for topic in sorted(pydoc_data.topics.topics)[:PROSE_TOPICS]:
        for piece in chunks(pydoc_data.topics.topics[topic], CHUNK):
            records.append({"text": piece, "kind": "prose", "source": f"pydoc_data.topics[{topic!r}]"})
    used = 0
    for name in CODE_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        for piece in chunks(source, CHUNK):
            if used >= CODE_BUDGET:
                break
            records.append({"text": piece, "kind": "code", "source": f"{name} (Python {sys.version.split()[0]})"})
            used += len(piece)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    prose = sum(len(r["text"]) for r in records if r["kind"] == "prose")
    print(f"{len(records)} records, {prose:,} characters of prose and {used:,} of code -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
