"""One rank of a test job under torchrun or mlx.launch (or started by hand with their environment):
runs a list of pissa commands in this one process, so that a job starts its processes once and
joins its group once (pissa.dist.current keeps it) for several commands.

    python -m tests.dist_worker PLAN.json

PLAN.json: {"results": DIR, "commands": [{"argv": [...], "hook": {...}}, ...]}. Each command runs
through pissa.cli.main (or pissa.jobs.init.run_init for {"run_init": {...}}); its exit code and what it
printed on stderr (unless "capture": false) go to DIR/rank-N.json after every command. Hooks break one rank on purpose:
  {"rank": 1, "signal": "SIGKILL" | "SIGSTOP", "step": S}   the rank signals itself as step S starts
  {"rank": 1, "fail_init": true}                          its first decomposition raises PissaError
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path


@contextlib.contextmanager
def hooked(hook: dict, rank: int):
    if not hook or hook.get("rank") != rank:
        yield
        return
    import pissa.adapters.inits
    import pissa.training.loop
    from pissa.errors import PissaError

    saved = (pissa.training.loop.lr_at, pissa.adapters.inits.decompose_many)
    if "signal" in hook:
        def lr_at(step, cfg):
            if step + 1 == hook["step"]:
                os.kill(os.getpid(), getattr(signal, hook["signal"]))
            return saved[0](step, cfg)

        pissa.training.loop.lr_at = lr_at
    if hook.get("fail_init"):
        def decompose_many(*args, **kwargs):
            raise PissaError(f"rank {rank} failed on purpose")

        pissa.adapters.inits.decompose_many = decompose_many
    try:
        yield
    finally:
        pissa.training.loop.lr_at, pissa.adapters.inits.decompose_many = saved


def run(command: dict) -> int:
    if "run_init" in command:
        from pissa.jobs.init import run_init
        from pissa.adapters.spec import AdapterSpec

        kw = dict(command["run_init"])
        if "quantize" in kw:
            from pissa.numeric.quant import scheme

            kw["quantize"] = scheme(*kw["quantize"])
        run_init(kw.pop("model"), kw.pop("out"), AdapterSpec(**kw.pop("spec")), progress=False, **kw)
        return 0
    from pissa.cli import main

    return main(command["argv"])


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", os.environ.get("MLX_RANK", "0")))
    out = Path(plan["results"]) / f"rank-{rank}.json"
    results = []
    for command in plan["commands"]:
        err = io.StringIO()
        # capture: false for a command that may lose contact, which prints and leaves at once
        grab = contextlib.redirect_stderr(err) if command.get("capture", True) else contextlib.nullcontext()
        with hooked(command.get("hook"), rank), grab:
            rc = run(command)
        results.append({"rc": rc, "stderr": err.getvalue()})
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
