"""Helpers for the 2-process tests (test_dist_torch.py, test_dist_mlx.py): starting a job of
tests/dist_worker.py ranks under a launcher or by hand, the small data they train on, and the
float32 tolerances the 2-rank results are held to against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pissa.files.formats.safetensors import load
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parent.parent
U = 2.0 ** -24  # float32 unit roundoff

# Every 1- and 2-rank run of these tests: global batch 4 (2 rows per rank) with two micro-batches
# per step (so DDP's no_sync and FSDP2's deferred reduce-scatter run), an eval and a checkpoint
# every 2 steps.
STEPS, BATCH, SEQ, LR = 4, 4, 96, 3e-3
TRAIN = ["--steps", str(STEPS), "--batch-size", str(BATCH), "--grad-accum", "2", "--max-seq-len", str(SEQ),
         "--lr", str(LR), "--eval-every", "2", "--save-every", "2", "--no-progress"]


def small_data(folder: Path) -> tuple[Path, Path]:
    """The first 32 training and 8 eval records as prompt/completion pairs: tokenising the whole
    split in every process would cost more than the training, and without the chat template's
    system prompt the sequences fit SEQ (and the 49k-word loss costs half as much)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for src, dst, n in ((DATA / "train.jsonl", paths[0], 32), (DATA / "eval.jsonl", paths[1], 8)):
        rows = [json.loads(line)["messages"] for line in src.read_text().splitlines()[:n]]
        dst.write_text("".join(json.dumps({"prompt": m[0]["content"], "completion": " " + m[1]["content"]}) + "\n"
                               for m in rows))
    return paths


# The edges of an epoch: five records, each alone in a row of SEQ tokens, in global batches of 2 rows
# with 2 micro-batches a step. An epoch is micro-batches of 2, 2 and 1 rows: with --epochs 1 the
# second step is short (one micro-batch, which must still sync) and its one row leaves rank 1 without
# any (it gets a filler); with --epochs 2 the second step holds the end of epoch 0 and the start of 1.
EDGES = {"epochs1": ["--epochs", "1"], "epochs2": ["--epochs", "2"]}
EDGE_TRAIN = ["--batch-size", "2", "--grad-accum", "2", "--max-seq-len", str(SEQ), "--lr", str(LR), "--save-every", "1",
              "--no-progress"]


def five_records(folder: Path) -> Path:
    """data for EDGES: five prompt/completion records of 50 to 90 tokens (more than half of SEQ)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "one two three four five six seven eight nine ten".split()
    path = folder / "five.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Count from {words[i]}:", "completion": " " + " ".join(
        words[(i + k) % 10] for k in range(48 + 4 * i))}) + "\n" for i in range(5)))
    return path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _plan(folder: Path, commands: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.json"
    path.write_text(json.dumps({"results": str(folder), "commands": commands}))
    return path


def _env(**extra: str) -> dict:
    # One BLAS thread per rank, as torchrun sets: two ranks share the 2 cores.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MLX_RANK", "MLX_HOSTFILE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def launch(launcher: str, folder: Path, commands: list[dict], timeout: float = 300) -> list[list[dict]]:
    """Run a 2-rank job under `launcher` ("torchrun" or "mlx.launch"), as the README says to;
    returns each rank's results (exit code and stderr per command)."""
    plan = _plan(folder, commands)
    worker = [sys.executable, "-m", "tests.dist_worker", str(plan)]
    if launcher == "torchrun":
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
               "tests.dist_worker", str(plan)]
    else:
        cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "-p", str(free_ports(1)[0]), "--", *worker]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]


def start_by_hand(backend: str, folder: Path, commands: list[dict]) -> list[subprocess.Popen]:
    """The 2 ranks started directly with the environment their launcher would give them, and no
    launcher watching: what a rank does when its peer dies or hangs is then pissa's alone."""
    plan = _plan(folder, commands)
    if backend == "torch":
        port = free_ports(1)[0]
        envs = [_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                for r in range(2)]
    else:
        hostfile = folder / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
        envs = [_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)) for r in range(2)]
    return [subprocess.Popen([sys.executable, "-m", "tests.dist_worker", str(plan)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]


def wait_until(condition, timeout: float, what: str) -> float:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic()


def stopped(proc: subprocess.Popen) -> bool:
    """Whether a process is stopped (SIGSTOP), from /proc (Linux)."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def gamma(n: int) -> float:
    """Higham's bound on the relative error of a float32 sum of n terms, whatever their order."""
    return n * U / (1 - n * U)


def loss_tolerance(loss: float) -> float:
    """Token losses are positive, so a float32 sum of the n <= BATCH * SEQ of one micro-batch is
    within gamma(n) of the exact sum in any order; one process and two ranks (two partial sums,
    then one addition) each are: 2 gamma(n) apart at most, plus 1e-6 for the 6 decimals logged."""
    return 2 * gamma(BATCH * SEQ) * loss + 1e-6


def adapter_tolerance(scale: float) -> float:
    """How far an adapter entry of magnitude <= scale may move from summation order alone, where
    its gradient does not cancel: per step it may round differently by one ulp (scale * 2^-23
    bounds it), and the reordered gradient sum (relative error <= gamma(n) for n terms without
    cancellation) moves the AdamW update, whose size is about lr and which is invariant to the
    gradient's scale, by about 2 lr gamma(n). Over STEPS steps these add; the factor 2 covers each
    next gradient, taken at parameters already moved.

    Where a gradient entry cancels to near zero (|g| within gamma(n) * sum |terms| of 0, or near
    AdamW's eps = 1e-8), its sign and so its first update (lr * g / (|g| + eps)) are noise in any
    summation order: such entries may differ by up to about 2 lr per step. They are rare; the test
    allows SPARE of them (measured here: 1 of about 16k entries, 2.3e-6 off, in the first step)."""
    return 2 * STEPS * (scale * 2.0 ** -23 + 2 * LR * gamma(BATCH * SEQ))


SPARE = 1e-3  # the fraction of adapter entries allowed past adapter_tolerance (cancelling gradients)


def compare_runs(one: Path, two: Path, start: Path | None = None) -> None:
    """The same losses (train and eval, every step) and the same final adapter, within the
    float32 tolerances above; and the training moved the adapter far more than them from `start`
    (an adapter folder; default: the run's step-2 checkpoint)."""
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [sorted(r) for r in rows[0]] == [sorted(r) for r in rows[1]]
    for a, b in zip(*rows):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= loss_tolerance(a[key]), (a, b, loss_tolerance(a[key]))
    a, b = (load(run / "adapter" / "adapter_model.safetensors") for run in (one, two))
    assert a.keys() == b.keys()
    scale = max(float(np.abs(x).max()) for x in a.values())
    diffs = np.concatenate([np.abs(a[k].astype(np.float64) - b[k]).ravel() for k in sorted(a)])
    bound = adapter_tolerance(scale)
    assert np.mean(diffs > bound) <= SPARE and diffs.max() <= 2 * LR * STEPS, (diffs.max(), np.mean(diffs > bound))
    start = load((start or one / "checkpoints" / "step-000002" / "adapter") / "adapter_model.safetensors")
    moved = np.concatenate([np.abs(a[k].astype(np.float64) - start[k]).ravel() for k in sorted(a)])
    assert np.median(moved) > 100 * bound  # training moved the adapter far more than the tolerance


def same_folders(a: Path, b: Path) -> None:
    """Byte for byte: the same files with the same contents."""
    files = [sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) for root in (a, b)]
    assert files[0] == files[1], files
    for rel in files[0]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders (.NAME.tmp-PID) left next to outputs."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)
