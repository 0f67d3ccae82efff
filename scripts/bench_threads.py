"""How OpenMP's waiting policy changes pissa's speed on this machine: the full-SVD init of SmolLM2
(torch, float32) and a short training run (torch and MLX), each alone and as two identical jobs at
once, under every threading setting in SETTINGS. scripts/env.sh takes its choice from this table.

Why it matters here: torch's LAPACK and the OpenBLAS that MLX is given run OpenMP thread pools.
With OMP_WAIT_POLICY=PASSIVE their idle threads sleep, and LAPACK's SVD, made of many small BLAS
calls, wakes them thousands of times; with unbounded spinning, two jobs on the same cores steal
each other's time. GOMP_SPINCOUNT bounds the spin.

    python scripts/bench_threads.py [--settings passive,default,bounded,one-thread] [--steps 8] [--skip-mlx]

Each measurement runs in a fresh process with the setting in its environment (the variables are
read when OpenMP starts); two-job rows start both processes together and report both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import threading_environment  # noqa: E402

SETTINGS = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "default": {},
    "bounded": {"GOMP_SPINCOUNT": "10000"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
    "one-thread-passive": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}
TIMEOUT = 600  # a job still running after this is stopped and reported as "> 600"
ROOT = Path(__file__).resolve().parent.parent


def child_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    return env


def init_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "pissa.cli", "init", "smollm2-135m", "--out", str(out), "--backend", "torch",
            "--compute-dtype", "float32", "--force", "--no-progress"]


def train_cmd(model: Path, out: Path, backend: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "pissa.cli", "train", str(model), "--data", str(ROOT / "data/arith/train.jsonl"),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--max-seq-len", "256", "--backend",
            backend, "--force", "--no-progress"]


def run_jobs(cmds: list[list[str]], env: dict[str, str]) -> list[float]:
    """Start the commands together; each one's wall time in seconds (inf past TIMEOUT: all are
    stopped then)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    times = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, TIMEOUT - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return [float("inf")] * len(cmds)
        if p.returncode != 0:
            raise SystemExit(f"failed: {' '.join(p.args)}\n{err[-2000:]}")
        times.append(time.perf_counter() - start)
    return times


def tokens_per_s(run: Path, seconds: float) -> float:
    if seconds == float("inf"):
        return 0.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    return rows[-1]["tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="passive,default,bounded")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip-mlx", action="store_true")
    args = p.parse_args()
    print(threading_environment())
    tmp = Path(tempfile.mkdtemp(prefix="bench_threads-"))
    model = tmp / "model"
    subprocess.run(init_cmd(model) + ["--init", "pissa-fast"], check=True, env=child_env("default"),
                   stdout=subprocess.DEVNULL)
    backends = ["torch"] + ([] if args.skip_mlx else ["mlx"])
    rows = []
    for setting in args.settings.split(","):
        env = child_env(setting)
        row = {"setting": setting}
        row["init 1 job (s)"] = run_jobs([init_cmd(tmp / "i1")], env)[0]
        print(json.dumps(row), flush=True)
        row["init 2 jobs (s)"] = max(run_jobs([init_cmd(tmp / "i2a"), init_cmd(tmp / "i2b")], env))
        print(json.dumps(row), flush=True)
        for backend in backends:
            t = run_jobs([train_cmd(model, tmp / "t1", backend, args.steps)], env)
            row[f"{backend} train 1 job (tok/s)"] = tokens_per_s(tmp / "t1", t[0])
            t = run_jobs([train_cmd(model, tmp / "t2a", backend, args.steps),
                          train_cmd(model, tmp / "t2b", backend, args.steps)], env)
            row[f"{backend} train 2 jobs (tok/s each)"] = (tokens_per_s(tmp / "t2a", t[0]) +
                                                           tokens_per_s(tmp / "t2b", t[1])) / 2
            print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(r["setting"] if k == "setting" else (f"> {TIMEOUT}" if r[k] == float("inf")
                                else f"{r[k]:.1f}") for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
