"""The `pissa` command. Bad input: one line on stderr naming the problem and the fix, exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pissa.errors import PissaError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; we want one line.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise PissaError(f"{message} (see: {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pissa", description="PiSSA fine-tuning for PyTorch and MLX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("init", help="decompose a model into a residual model and a PiSSA adapter",
                       description="Write the residual model to OUT and the initial adapter to OUT/pissa_init.")
    q.add_argument("model", help="model folder, .gguf file, or an embedded name (smollm2-135m)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--rank", type=_positive_int, default=16, help="adapter rank r (default 16)")
    q.add_argument("--alpha", type=_number, default=None, help="LoRA alpha (default: the rank)")
    q.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    q.add_argument("--targets", default="all-linear",
                   help="all-linear, module names (q_proj,v_proj) or a regex over module paths")
    q.add_argument("--init", default="pissa", help="pissa (full SVD), pissa-fast (randomised SVD) or lora")
    q.add_argument("--niter", type=_positive_int, default=4, help="power iterations for pissa-fast (default 4)")
    q.add_argument("--oversampling", type=_positive_int, default=8,
                   help="extra sketch columns for pissa-fast (default 8)")
    q.add_argument("--seed", type=_positive_int, default=0, help="seed of every random matrix (default 0)")
    q.add_argument("--backend", default="numpy", help="numpy, torch or mlx (default numpy)")
    q.add_argument("--device", default=None, help="the backend's device, e.g. cpu or cuda")
    q.add_argument("--compute-dtype", default="float64",
                   help="float64 (default: backends agree) or float32 (faster)")
    q.add_argument("--dtype", default="float32", help="storage dtype: float32, bfloat16 or float16")
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    q.set_defaults(func=_cmd_init)
    return p


def _cmd_init(args: argparse.Namespace) -> int:
    from pissa.init import run_init
    from pissa.spec import AdapterSpec, parse_targets

    spec = AdapterSpec(rank=args.rank, alpha=args.alpha, use_rslora=args.rslora,
                       targets=parse_targets(args.targets), init=args.init, niter=args.niter,
                       oversampling=args.oversampling, seed=args.seed, dtype=args.dtype,
                       compute_dtype=args.compute_dtype)
    summary = run_init(args.model, args.out, spec, backend=args.backend, device=args.device,
                       force=args.force, progress=not args.no_progress)
    print(summary.line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PissaError as e:
        print(f"pissa: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pissa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
