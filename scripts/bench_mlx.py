"""Benchmark the MLX backend on SmolLM2-135M (fp32, all linear layers, r=16), side by side in one
run: training against mlx-lm's own LoRA, and init against the torch backend on the same machine;
then QPiSSA (affine4, group 64): init time per iteration, training memory against PiSSA's, and
training speed against QLoRA (mlx-lm's LoRA on the model quantised by mlx-lm's quantize_model).
Prints a table of ratios; docs/benchmarks.md records the figures.

    python scripts/bench_mlx.py [--quick] [--only pissa|qpissa] [--targets all-linear] [--steps N] [--rounds N] [--seq N]

--targets, --steps and --seq shrink a smoke run (e.g. --only qpissa --targets q_proj --steps 1
--seq 32); the full benchmark uses their defaults. On the CPU, mlx-lm's QLoRA step is slow (MLX's
CPU quantized_matmul has no BLAS behind it), so its row takes minutes per step at 4 x 256.

On Linux, run it with OpenBLAS preloaded (`. scripts/env.sh` does it), or MLX's matmuls use the
reference BLAS and every MLX figure is 20-30x slower. Each measurement runs in a fresh subprocess,
so its peak memory (MLX's allocator peak, and the process's ru_maxrss) is its own; the training
speed against mlx-lm is the exception: both sides in one process, their steps alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import threading_environment  # noqa: E402

BATCH = 4
SEQ = int(os.environ.get("PISSA_BENCH_SEQ", "256"))  # --seq sets it for the children too (smoke runs)
QUANT, GROUP = "affine4", 64  # QPiSSA's scheme here, and the 4-bit group-64 quantisation of QLoRA


# ---------------------------------------------------------------- measurements (child side)
def init_time(backend: str, init: str, compute: str, out: str, targets: str = "all-linear",
              quantize: str | None = None, quant_iters: int = 1) -> dict:
    from pissa.jobs.init import run_init
    from pissa.numeric.quant import scheme
    from pissa.adapters.spec import AdapterSpec, parse_targets

    t = time.perf_counter()
    run_init("smollm2-135m", out, AdapterSpec(rank=16, init=init, compute_dtype=compute, targets=parse_targets(targets)),
             backend=backend, progress=False, force=True, quantize=scheme(quantize, GROUP) if quantize else None,
             quant_iters=quant_iters)
    return {"seconds": time.perf_counter() - t}


def _timed_steps(step, steps: int) -> float:
    times = []
    for i in range(steps + 2):  # 2 warm-up steps: mx.compile traces on the first
        t = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return BATCH * SEQ * len(times) / sum(times)


def make_step(which: str, model_dir: str, ids):
    """One training step (forward + backward + AdamW at batch 4 x 256), each side with its own
    loop's step; the step function runs it to completion.

    which: "ours" (a pissa init folder, QPiSSA ones included), "mlx-lm" (its LoRA, r=16, on every
    linear layer of the folder's model) or "mlx-lm-q4" (QLoRA: the same after mlx-lm's
    quantize_model, 4-bit affine, group 64, as `mlx_lm.convert -q` does: every Linear and the
    embedding). Speed and memory do not depend on the weights' values, so the baselines may run
    on the residual folder's weights.
    """
    import mlx.core as mx

    if which == "ours":
        from pissa_mlx import load
        import numpy as np
        from pissa_mlx.backend import to_arrays
        from pissa_mlx.train import compiled_steps, make_optimizer

        from pissa.training.run import TrainConfig

        model, _ = load(model_dir)
        model.train()
        cfg = TrainConfig(lr=1e-5)
        opt = make_optimizer(cfg)
        opt.init(model.trainable_parameters())
        micro_step, update = compiled_steps(model, opt, cfg)
        weight = mx.array(1.0 / ids[:, 1:].size)  # the gradient of the mean token loss
        ids_np = np.array(ids)
        batch = to_arrays({"input_ids": ids_np, "labels": ids_np}, 0)

        def step():  # as pissa_mlx.train's loop: loss read back, then the clipped AdamW step
            loss, grads = micro_step(batch, weight)  # loss: the sum over the batch's tokens
            mx.eval(loss, grads)
            loss.item()
            opt.learning_rate = 1e-5
            update(grads)
            mx.eval(model.trainable_parameters(), opt.state)
        return step

    from functools import partial

    import mlx.optimizers as optim
    from mlx import nn
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, config = load_model(Path(model_dir))
    if which == "mlx-lm-q4":
        from mlx_lm.utils import quantize_model

        model, _ = quantize_model(model, config, group_size=GROUP, bits=4)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 16, "scale": 1.0, "dropout": 0.0})
    model.train()
    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]
    lengths = mx.array([[0, ids.shape[1]]] * ids.shape[0])

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch, lengths):  # mlx_lm.tuner.trainer.train's step, without accumulation
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        opt.update(model, grad)
        return lvalue, toks

    def step():
        lvalue, toks = compiled(ids, lengths)
        mx.eval(state, lvalue, toks)
    return step


def batch_ids():
    import mlx.core as mx

    mx.random.seed(0)
    return mx.random.randint(0, 49152, (BATCH, SEQ)).astype(mx.int32)


def train_speed(which: str, model_dir: str, steps: int) -> dict:
    """Tokens/s and peak memory of one side alone in this process (see make_step)."""
    import mlx.core as mx

    from pissa.memory import peak_rss_mib

    step = make_step(which, model_dir, batch_ids())
    mx.reset_peak_memory()
    tps = _timed_steps(step, steps)
    return {"tokens_per_s": tps, "peak_mib": mx.get_peak_memory() / 2**20, "rss_mib": peak_rss_mib()}


def train_pair(model_dir: str, steps: int) -> dict:
    """Ours and mlx-lm's LoRA in one process, their steps alternating (2 warm-up steps each, then
    `steps` timed rounds): both sides see the same machine state, so the slow drifts of a shared
    machine (single steps here range over +-15%) cancel in the ratio. Seconds of every step."""
    ids = batch_ids()
    sides = {w: make_step(w, model_dir, ids) for w in ("ours", "mlx-lm")}
    for step in sides.values():
        step()
        step()
    times: dict[str, list[float]] = {w: [] for w in sides}
    for _ in range(steps):
        for w, step in sides.items():
            t = time.perf_counter()
            step()
            times[w].append(time.perf_counter() - t)
    return times


def child(spec: str) -> None:
    kind, args = json.loads(spec)
    fn = {"init_time": init_time, "train_speed": train_speed, "train_pair": train_pair}[kind]
    print("RESULT " + json.dumps(fn(*args)), flush=True)


# ---------------------------------------------------------------- orchestration (parent side)
def measure(*args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([args[0], list(args[1:])])],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    global SEQ
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing steps")
    ap.add_argument("--only", choices=("pissa", "qpissa"), help="run only the PiSSA or only the QPiSSA rows")
    ap.add_argument("--targets", default="all-linear", help="layers to decompose (all-linear; narrower for a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 8, 3 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating step pairs for the speed ratio against mlx-lm (default 12, 3 with --quick)")
    ap.add_argument("--seq", type=int, default=None, help=f"sequence length of the training batches (default {SEQ})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    import mlx.core as mx

    blas = os.environ.get("LD_PRELOAD", "") if sys.platform == "linux" else "n/a"
    print(f"# bench_mlx: SmolLM2-135M, fp32, all linear layers, r=16, MLX {mx.__version__} on "
          f"{mx.default_device()} ({os.cpu_count()} CPU cores), LD_PRELOAD={blas or 'none'}, {time.strftime('%Y-%m-%d')}")
    print("# " + threading_environment())
    if sys.platform == "linux" and "openblas" not in blas:
        print("# warning: OpenBLAS is not preloaded; MLX matmuls use the reference BLAS (. scripts/env.sh)")
    rows: list[tuple[str, str, str, str]] = []
    steps = a.steps or (3 if a.quick else 6)
    rounds = a.rounds or (3 if a.quick else 12)
    if a.seq:
        SEQ = a.seq
        os.environ["PISSA_BENCH_SEQ"] = str(a.seq)
    with tempfile.TemporaryDirectory() as work:
        model_dir = f"{work}/m-pissa-fast-float64"
        if a.only in (None, "pissa"):
            for init in ("pissa", "pissa-fast"):
                for compute in ("float64", "float32"):
                    m = measure("init_time", "mlx", init, compute, f"{work}/m-{init}-{compute}", a.targets)["seconds"]
                    t = measure("init_time", "torch", init, compute, f"{work}/t-{init}-{compute}", a.targets)["seconds"]
                    rows.append((f"init {init} ({compute}), end to end", f"{m:.1f} s", f"{t:.1f} s (torch)",
                                 f"{m / t:.2f} (reported)"))
        else:
            measure("init_time", "mlx", "pissa-fast", "float64", model_dir, a.targets)
        ours = measure("train_speed", "ours", model_dir, 2)  # memory; alone, so the peak is ours only
        if a.only in (None, "pissa"):
            theirs = measure("train_speed", "mlx-lm", model_dir, 2)
            # Speed: alternating steps in one process. Separate processes, one per side, swung the
            # ratio between 0.82 and 1.05 on this shared 2-core machine.
            times = measure("train_pair", model_dir, rounds)
            tps = {w: BATCH * SEQ / statistics.median(t) for w, t in times.items()}
            wins = sum(o < m for o, m in zip(times["ours"], times["mlx-lm"]))
            rows.append((f"train tokens/s, batch {BATCH} x {SEQ}, median of {rounds} alternating steps",
                         f"{tps['ours']:.0f}", f"{tps['mlx-lm']:.0f} (mlx-lm)",
                         f"{tps['ours'] / tps['mlx-lm']:.2f} (target >= 1.0); ours faster in {wins} of {rounds} rounds"))
            rows.append(("train peak MLX memory (MiB)", f"{ours['peak_mib']:.0f}", f"{theirs['peak_mib']:.0f} (mlx-lm)",
                         f"{ours['peak_mib'] / theirs['peak_mib']:.2f} (target <= 1.05)"))
            rows.append(("train peak process RSS (MiB)", f"{ours['rss_mib']:.0f}", f"{theirs['rss_mib']:.0f} (mlx-lm)",
                         f"{ours['rss_mib'] / theirs['rss_mib']:.2f}"))
        if a.only in (None, "qpissa"):
            rows += qpissa_rows(work, model_dir, ours, steps, a.targets)
    print_table(["measure", "ours (mlx)", "reference", "ratio"], rows)


def qpissa_rows(work: str, model_dir: str, pissa: dict, steps: int, targets: str) -> list[tuple[str, str, str, str]]:
    """QPiSSA (affine4, pissa-fast, float64 compute): init with 1 and 5 iterations (the extra
    iterations' cost is the time per iteration), then training on the 1-iteration folder against
    PiSSA's training (memory; `pissa` is its train_speed) and against QLoRA (speed)."""
    q1, q5 = f"{work}/q-1", f"{work}/q-5"
    t1 = measure("init_time", "mlx", "pissa-fast", "float64", q1, targets, QUANT, 1)["seconds"]
    t5 = measure("init_time", "mlx", "pissa-fast", "float64", q5, targets, QUANT, 5)["seconds"]
    ours = measure("train_speed", "ours", q1, steps)
    qlora = measure("train_speed", "mlx-lm-q4", model_dir, steps)
    return [
        (f"QPiSSA init {QUANT}, 1 vs 5 iterations", f"{t1:.1f} s / {t5:.1f} s", "",
         f"{(t5 - t1) / 4:.1f} s per extra iteration"),
        ("QPiSSA train peak MLX memory (MiB)", f"{ours['peak_mib']:.0f}", f"{pissa['peak_mib']:.0f} (PiSSA fp32)",
         f"{ours['peak_mib'] / pissa['peak_mib']:.2f}"),
        ("QPiSSA train peak process RSS (MiB)", f"{ours['rss_mib']:.0f}", f"{pissa['rss_mib']:.0f} (PiSSA fp32)",
         f"{ours['rss_mib'] / pissa['rss_mib']:.2f}"),
        (f"QPiSSA train tokens/s, batch {BATCH} x {SEQ}", f"{ours['tokens_per_s']:.0f}",
         f"{qlora['tokens_per_s']:.0f} (QLoRA, mlx-lm 4-bit g{GROUP})",
         f"{ours['tokens_per_s'] / qlora['tokens_per_s']:.2f}"),
        ("QPiSSA train peak MLX memory vs QLoRA (MiB)", f"{ours['peak_mib']:.0f}", f"{qlora['peak_mib']:.0f} (QLoRA)",
         f"{ours['peak_mib'] / qlora['peak_mib']:.2f}"),
    ]


def print_table(head: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
