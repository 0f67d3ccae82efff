"""MoRA's memorisation benchmark (arXiv 2405.12130, section 5.1) on SmolLM2-135M, on our backends.

Random UUID pairs (a seeded generator; nothing is downloaded) are learnt as prompt -> completion:
"<uuid a>\\n" -> "<uuid b>". Every method trains the same batches at the same parameter budget
(rank 8): LoRA, PiSSA, MoRA sharing and MoRA rotation (and full fine-tuning where `pissa train`
has it), each at its own learning rate (--lr METHOD=LR). At every --eval-every steps the script
generates each pair's target greedily and reports the character accuracy: the share of the 36
characters of the target UUID that come out in the right place.

    python scripts/bench_memorize.py --backend torch            # about 30 minutes on 2 CPU cores
    python scripts/bench_memorize.py --backend mlx
    python scripts/bench_memorize.py --smoke                    # a few steps, to check the script

Prints one table per backend (method x step) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import shutil
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import threading_environment  # noqa: E402

from pissa.jobs.init import run_init  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from pissa.training.run import TrainConfig  # noqa: E402

METHODS = {
    "lora": dict(init="lora"),
    "pissa": dict(init="pissa-fast"),
    "mora-sharing": dict(kind="mora", options={"mora_type": "sharing"}),
    "mora-rotation": dict(kind="mora", options={"mora_type": "rotation"}),
    "full": dict(kind="full"),
}
DEFAULT_LR = {"lora": 2e-3, "pissa": 2e-3, "mora-sharing": 2e-3, "mora-rotation": 2e-3, "full": 1e-4}


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(2 * n)]
    return list(zip(ids[:n], ids[n:]))


def char_accuracy(answer: str, target: str) -> float:
    answer = answer.strip()
    return sum(a == b for a, b in zip(answer, target)) / len(target)


def answers(backend: str, model_dir: Path, adapter: Path, prompts: list[str], batch: int) -> list[str]:
    """Greedy completions, batched, with the backend's own `pissa eval` decoding."""
    from pissa.studies.evaluate import Session

    session = Session(backend, model_dir, adapter, "cpu")
    out = []
    for i in range(0, len(prompts), batch):
        out += session.generate(prompts[i:i + batch], 40)
    return out


def weight_change(init: Path, adapter: Path) -> float:
    """||W_t - W_0||_F / ||W_0||_F over every target, each W as its kind merges the adapter (W_0:
    with the init's own adapter, which for every kind here is the model itself)."""
    from pissa.files.formats.peft import load_adapter
    from pissa.files.loaders import open_model

    start, trained = load_adapter(init / "pissa_init"), load_adapter(adapter)
    kind, base = trained.spec.kind_module, open_model(str(init))
    moved = total = 0.0
    for module, params in trained.factors.items():
        W = base.get(module + ".weight")
        W0 = kind.merged(start.spec, start.factors[module], W) if start.factors.get(module) else W
        moved += float(np.sum((kind.merged(trained.spec, params, W).astype(np.float64) - W0) ** 2))
        total += float(np.sum(W0.astype(np.float64) ** 2))
    return (moved / total) ** 0.5


def run_method(backend: str, method: str, lr: float, args, data: Path, pairs, root: Path) -> dict:
    init = root / f"init-{method}"
    if not (init / "pissa_init").is_dir():
        run_init("smollm2-135m", init, AdapterSpec(rank=args.rank, compute_dtype="float32", **METHODS[method]),
                 backend="numpy", force=True, progress=False)
    from pissa.training.train import train

    # Every measured step's checkpoint is kept until measured, then deleted (unless --keep).
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_ratio=0.0,
                      max_seq_len=128, save_every=args.eval_every, keep_checkpoints=0, seed=0)
    run = root / f"run-{backend}-{method}"
    t0 = time.perf_counter()
    summary = train(backend, init, data, run, cfg, force=True, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    prompts = [f"{a}\n" for a, _ in pairs]
    accuracy = {}
    first = run / "checkpoints" / f"step-{args.eval_every:06d}" / "adapter"
    moved = weight_change(init, first)
    print(f"  {backend} {method}: weights moved {moved:.2e} (relative) by step {args.eval_every}", flush=True)
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        adapter = run / "checkpoints" / f"step-{step:06d}" / "adapter"
        got = answers(backend, init, adapter, prompts, args.batch_size)
        accuracy[step] = float(np.mean([char_accuracy(g, b) for g, (_, b) in zip(got, pairs)]))
        print(f"  {backend} {method} step {step}: char accuracy {accuracy[step]:.1%}", flush=True)
    if not args.keep:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return {"lr": lr, "accuracy": accuracy, "final_loss": summary["loss"], "train_seconds": seconds,
            "tokens_per_s": summary["tokens_per_s"], "moved": moved}


def table(backend: str, results: dict, steps: list[int]) -> str:
    head = (f"| {backend} | lr | " + " | ".join(f"step {s}" for s in steps)
            + f" | final loss | weights moved by step {steps[0]} |")
    rule = "|" + " --- |" * (len(steps) + 4)
    rows = [f"| {m} | {r['lr']:g} | " + " | ".join(f"{100 * r['accuracy'][s]:.1f}" for s in steps)
            + f" | {r['final_loss']:.3f} | {r['moved']:.2e} |" for m, r in results.items()]
    return "\n".join([head, rule, *rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", help="torch, mlx or both")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lr", action="append", default=[], help="METHOD=LR (repeatable)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_memorize")
    p.add_argument("--smoke", action="store_true", help="4 pairs, 4 steps: checks the script runs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep every run's checkpoints (deleted once measured)")
    args = p.parse_args()
    if args.smoke:
        args.pairs, args.steps, args.eval_every, args.batch_size = 4, 4, 2, 4
    lrs = dict(DEFAULT_LR)
    lrs.update((k, float(v)) for k, v in (item.split("=") for item in args.lr))
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.pairs, args.seed)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}\n", "completion": b}) + "\n" for a, b in pairs))
    print(threading_environment())
    backends = ["torch", "mlx"] if args.backend == "both" else [args.backend]
    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    report = {"pairs": args.pairs, "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank,
              "backends": {}}
    for backend in backends:
        results = {}
        t0 = time.perf_counter()
        for method in args.methods.split(","):
            results[method] = run_method(backend, method, lrs[method], args, data, pairs, root)
        report["backends"][backend] = {"methods": results, "seconds": time.perf_counter() - t0}
        (root / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\ncharacter accuracy (%) of the generated target UUID, {args.pairs} pairs, batch "
              f"{args.batch_size}, rank {args.rank}; {time.perf_counter() - t0:.0f} s on {backend}")
        print(table(backend, results, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
