"""Does an adapter give the same model on two machines (or two backends)?

Computes the logits of a pissa model folder + adapter on fixed prompts, in float32, and compares
them (max |a - b| / max |b| over all prompts; verdict at 1e-4, the project's portability bound).

    # on this machine, both backends:
    python scripts/portability_check.py local out/smollm2-torch --adapter out/run-torch/adapter
    # between two machines (e.g. a CUDA server with torch and a Mac with MLX):
    python scripts/portability_check.py dump MODEL_DIR --adapter ADAPTER --backend torch --out server.npz
    python scripts/portability_check.py dump MODEL_DIR --adapter ADAPTER --backend mlx --out mac.npz
    python scripts/portability_check.py compare server.npz mac.npz

Exit code 0: portable; 1: the logits differ by more than the tolerance; 2: bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Mia has 23 marbles. She buys 4 bags of 6 marbles. How many marbles does she have now?",
    "Write one sentence about the sea.",
]
TOLERANCE = 1e-4


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in PROMPTS]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tok(p)["input_ids"] for p in PROMPTS]


def logits(model_dir: Path, adapter: str | None, backend: str, ids: list[list[int]]) -> list[np.ndarray]:
    if backend == "torch":
        import pissa_torch
        import torch

        model, _ = pissa_torch.load(model_dir, adapter, device="cpu")
        with torch.no_grad():
            return [model(torch.tensor([x])).logits[0].numpy() for x in ids]
    if backend == "mlx":
        import mlx.core as mx
        import pissa_mlx

        model, _ = pissa_mlx.load(model_dir, adapter)
        return [np.array(model(mx.array([x]))[0]) for x in ids]
    raise SystemExit(f"portability_check: unknown backend {backend!r}; use torch or mlx")


def dump(model_dir: Path, adapter: str | None, backend: str) -> dict[str, np.ndarray]:
    ids = prompt_ids(model_dir)
    out = {"backend": np.array(backend)}
    for i, (x, y) in enumerate(zip(ids, logits(model_dir, adapter, backend, ids))):
        out[f"ids_{i}"], out[f"logits_{i}"] = np.array(x), y.astype(np.float32)
    return out


def compare(a: dict, b: dict, tol: float) -> int:
    n = len([k for k in a if k.startswith("ids_")])
    if n != len([k for k in b if k.startswith("ids_")]) or any(
            not np.array_equal(a[f"ids_{i}"], b[f"ids_{i}"]) for i in range(n)):
        print("portability_check: the two dumps tokenised different prompts (another tokenizer?); not comparable")
        return 2
    diff = max(float(np.abs(a[f"logits_{i}"].astype(np.float64) - b[f"logits_{i}"]).max()) for i in range(n))
    scale = max(float(np.abs(b[f"logits_{i}"]).max()) for i in range(n))
    rel = diff / scale
    same_argmax = all(np.array_equal(a[f"logits_{i}"].argmax(-1), b[f"logits_{i}"].argmax(-1)) for i in range(n))
    names = f"{a['backend']} vs {b['backend']}"
    verdict = "PORTABLE" if rel <= tol else "NOT PORTABLE"
    print(f"{verdict}: {names}, {n} prompts, max relative logits difference {rel:.2e} (tolerance {tol:.0e}), "
          f"greedy next tokens {'identical' if same_argmax else 'DIFFER'}")
    return 0 if rel <= tol else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("dump", "local"):
        s = sub.add_parser(name)
        s.add_argument("model_dir", type=Path, help="a folder written by pissa init")
        s.add_argument("--adapter", default=None, help="adapter folder (default MODEL_DIR/pissa_init)")
        s.add_argument("--tol", type=float, default=TOLERANCE)
        if name == "dump":
            s.add_argument("--backend", required=True, help="torch or mlx")
            s.add_argument("--out", required=True, type=Path, help="the .npz to write")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--tol", type=float, default=TOLERANCE)
    args = p.parse_args(argv)
    from pissa.errors import PissaError

    try:
        if args.cmd == "dump":
            np.savez(args.out, **dump(args.model_dir, args.adapter, args.backend))
            print(f"portability_check: wrote {args.out}")
            return 0
        if args.cmd == "compare":
            return compare(dict(np.load(args.a)), dict(np.load(args.b)), args.tol)
        return compare(dump(args.model_dir, args.adapter, "mlx"), dump(args.model_dir, args.adapter, "torch"), args.tol)
    except PissaError as e:
        print(f"portability_check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
