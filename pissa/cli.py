"""The `pissa` command. Bad input: one line on stderr naming the problem and the fix, exit 2."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from typing import Sequence

from pissa import dist
from pissa.adapters import inits, kinds
from pissa.adapters.spec import DEFAULT_RANK
from pissa.errors import LostContact, PeerFailed, PissaError
from pissa.numeric.qpissa import DEFAULT_RANK as QPISSA_RANK

EXIT_USAGE = 2
DISTRIBUTED = ("init", "train")  # the commands that split their work over torchrun's or mlx.launch's ranks
_default_showwarning = warnings.showwarning


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; we want one line.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise PissaError(f"{message} (see: {self.prog} --help)")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)  # counts where 0 means "none" or "off": --seed, --niter, --eval-every


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _listing(registry) -> str:
    return ", ".join(f"{name} ({registry.get(name).HELP})" for name in registry.names())


KIND_HELP = _listing(kinds)
INIT_HELP = _listing(inits) + "; " + " and ".join(
    f"--init {k}" for k in kinds.names() if not kinds.get(k).LORA_SHAPED) + " stand for --kind " + " and ".join(
    k for k in kinds.names() if not kinds.get(k).LORA_SHAPED)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pissa", description="PiSSA fine-tuning for PyTorch and MLX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("init", help="decompose a model into a residual model and a PiSSA adapter (or start MoRA)",
                       description="Write the residual model to OUT and the initial adapter to OUT/pissa_init "
                                   "(MoRA: the unchanged model to OUT, M = 0 to OUT/pissa_init).")
    q.add_argument("model", help="model folder, .gguf file, Hub id (org/name), or an embedded name (smollm2-135m)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--rank", type=_positive_int, default=None,
                   help=f"adapter rank r (default {DEFAULT_RANK}; {QPISSA_RANK} with --quantize)")
    q.add_argument("--alpha", type=_number, default=None, help="LoRA alpha (default: the rank)")
    q.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    q.add_argument("--rank-pattern", default=None, metavar="NAME=R,...",
                   help="per-module ranks, as PEFT's rank_pattern: q_proj=8,layers\\.0\\..*=32 (a module takes the "
                        "first name or regex matching the end of its path)")
    q.add_argument("--alpha-pattern", default=None, metavar="NAME=A,...", help="per-module alphas, likewise")
    q.add_argument("--targets", default="all-linear",
                   help="all-linear, module names (q_proj,v_proj) or a regex over module paths")
    q.add_argument("--kind", default="lora", help="what the adapted layers compute: " + KIND_HELP)
    q.add_argument("--init", default=None, help="how a LoRA-shaped kind starts: " + INIT_HELP)
    for name, (kind, option) in kinds.options().items():
        q.add_argument("--" + name.replace("_", "-"), default=None, choices=option.choices,
                       help=f"{option.help} (default {option.default})")
    q.add_argument("--niter", type=_non_negative_int, default=4, help="power iterations for pissa-fast (default 4)")
    q.add_argument("--oversampling", type=_non_negative_int, default=8,
                   help="extra sketch columns for pissa-fast (default 8)")
    q.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every random matrix (default 0)")
    q.add_argument("--backend", default="numpy", help="numpy, torch or mlx (default numpy)")
    q.add_argument("--device", default=None, help="the backend's device, e.g. cpu or cuda")
    q.add_argument("--compute-dtype", default="float64",
                   help="float64 (default: backends agree) or float32 (faster)")
    q.add_argument("--dtype", default=None,
                   help="storage dtype of the residual model and adapter: float32, bfloat16 or float16 (default: "
                        "the input's own; bfloat16 for a quantised input, which is dequantised)")
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    q.add_argument("--svd-batch", type=_positive_int, default=None,
                   help="decompose up to N same-shape matrices per call (default: the backend's measured best)")
    q.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="QPiSSA: quantise the residual with nf4 (bitsandbytes; torch), int8 or affine4 "
                        "(MLX's affine scheme; torch and mlx)")
    q.add_argument("--group-size", type=_positive_int, default=64,
                   help="values per quantisation block or group (default 64)")
    q.add_argument("--quant-iters", type=_positive_int, default=None,
                   help="QPiSSA iterations: re-decompose W - deq(Q(W_res)) this many times (default 5, the paper's)")
    q.add_argument("--no-kl", action="store_true",
                   help="with --quantize: skip the step-0 KL against QLoRA (it runs the model three times)")
    q.add_argument("--kl", action="store_true",
                   help="with --quantize: measure the step-0 KL even for a model above 1B parameters, where it is "
                        "skipped by default (it holds two float32 copies of the model)")
    _dist_args(q)
    q.set_defaults(func=_cmd_init)

    t = sub.add_parser("train", help="train the PiSSA adapter of a pissa init folder",
                       description="Train MODEL_DIR/pissa_init on JSON-lines data; writes RUN_DIR/adapter, "
                                   "RUN_DIR/lora, RUN_DIR/checkpoints/, metrics.jsonl and loss.png.")
    t.add_argument("model_dir", help="a folder written by pissa init")
    t.add_argument("--data", required=True, help="training data, .jsonl (text, prompt/completion or messages)")
    t.add_argument("--eval-data", default=None, help="held-out .jsonl for the eval loss")
    t.add_argument("--out", required=True, help="the run folder")
    t.add_argument("--backend", default="auto", help="torch or mlx (default: mlx on Apple silicon, else torch)")
    t.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    t.add_argument("--adapter", default=None, help="start from this adapter instead of MODEL_DIR/pissa_init")
    t.add_argument("--steps", type=_positive_int, default=None,
                   help="optimizer steps (default: --epochs' worth, else 100); wins over --epochs")
    t.add_argument("--epochs", type=_positive_int, default=None, help="whole passes over the data")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help="rows per micro-batch (default 4), all ranks together; with packing a row holds as many "
                        "records as fit in --max-seq-len tokens; with --batch-tokens a cap on the rows (default: none)")
    t.add_argument("--batch-tokens", type=_positive_int, default=None,
                   help="size micro-batches by real tokens instead: rows (of up to --max-seq-len) while they hold at "
                        "most N tokens, all ranks together")
    t.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack records into rows of --max-seq-len tokens, each attending only to itself (default); "
                        "--no-packing pads one record per row")
    t.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step (default 1)")
    t.add_argument("--lr", type=_number, default=1e-4, help="peak learning rate (default 1e-4)")
    t.add_argument("--warmup-ratio", type=_number, default=0.03, help="warmup fraction of steps (default 0.03)")
    t.add_argument("--weight-decay", type=_number, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--max-grad-norm", type=_number, default=1.0, help="gradient clipping (default 1.0)")
    t.add_argument("--max-seq-len", type=_positive_int, default=256, help="tokens per sequence (default 256)")
    t.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the data order and dropout (default 0)")
    t.add_argument("--dropout", type=_number, default=None,
                   help="dropout on the adapter's input in training, PEFT's lora_dropout (default: the adapter's, 0 "
                        "for pissa init's)")
    t.add_argument("--eval-every", type=_non_negative_int, default=0, help="eval every N steps (default: at the end)")
    t.add_argument("--log-every", type=_positive_int, default=1,
                   help="read and log the loss every N steps (default 1); each read makes the host wait for the "
                        "GPU, so on a GPU a larger N keeps it busy (NaN is then noticed up to N steps late, and "
                        "always before a checkpoint)")
    t.add_argument("--save-every", type=_non_negative_int, default=0,
                   help="checkpoint every N steps (default: none; RUN_DIR/adapter holds the result)")
    t.add_argument("--save-at", default=None, metavar="STEPS",
                   help="comma-separated steps to checkpoint as well, e.g. 20,60")
    t.add_argument("--keep-checkpoints", type=_non_negative_int, default=2,
                   help="keep the newest N checkpoints, deleting older ones once a newer one is written "
                        "(default 2; 0 keeps every one)")
    t.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (auto: bf16 on CUDA, else fp32)")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    t.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile each decoder layer (off by default: docs/benchmarks.md)")
    t.add_argument("--shard", action="store_true",
                   help="under torchrun: split weights, gradients and optimizer state over the ranks (FSDP2) "
                        "instead of a full replica per rank (DDP)")
    _dist_args(t)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--force", action="store_true", help="replace a non-empty --out")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("convert", help="turn a trained adapter into a plain LoRA on the original model",
                       description="PiSSA: a rank-2r LoRA (needs --initial); sharing MoRA: a LoRA of rank r_hat. "
                                   "As a PEFT folder (vLLM, PEFT), also in mlx-lm's format, or as llama.cpp's LoRA "
                                   "GGUF (llama.cpp, Ollama).")
    c.add_argument("--initial", default=None,
                   help="the pissa_init folder of the model that was trained (PiSSA and LoRA; MoRA needs none)")
    c.add_argument("--trained", required=True, help="the trained adapter (RUN_DIR/adapter)")
    c.add_argument("--out", required=True, help="the LoRA folder to write (PEFT format), or FILE.gguf")
    c.add_argument("--format", default=None,
                   help="peft (default), mlx-lm (also mlx-lm's files, in OUT/mlx_lm) or gguf (llama.cpp's LoRA "
                        "file; the default for a .gguf --out)")
    c.add_argument("--gguf-type", default=None, help="with --format gguf: f32 (default), f16, bf16 or q8_0")
    c.add_argument("--model", default=None,
                   help="with --format gguf: the model the LoRA runs on, for its architecture (default: the folder "
                        "of --initial, else the model the run of --trained used)")
    c.add_argument("--base", default="original", choices=("original", "residual"),
                   help="with --format gguf: original (default: the converted LoRA, for the original model's GGUF) "
                        "or residual (the trained adapter itself, for a GGUF of the residual model)")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out")
    c.set_defaults(func=_cmd_convert)

    m = sub.add_parser("merge", help="merge an adapter into its model's weights (Hugging Face folder or GGUF file)")
    m.add_argument("model", help="the model the adapter applies to (residual folder, or the original for a LoRA)")
    m.add_argument("--adapter", default=None,
                   help="adapter folder (PEFT format; PiSSA, LoRA or MoRA); without it, MODEL is written as it is")
    m.add_argument("--out", required=True,
                   help="the merged model folder to write, or FILE.gguf (one file for llama.cpp, Ollama, LM Studio)")
    m.add_argument("--dtype", default=None, help="storage dtype of a folder (default: the model's)")
    m.add_argument("--gguf-type", default=None, help="type of a .gguf --out: f32, f16 (default), bf16 or q8_0")
    m.add_argument("--force", action="store_true", help="replace a non-empty --out")
    m.set_defaults(func=_cmd_merge)

    e = sub.add_parser("eval", help="eval loss and exact-match accuracy on a .jsonl split")
    _inference_args(e)
    e.add_argument("--data", required=True, help="eval data, .jsonl (prompt/completion or messages)")
    e.add_argument("--limit", type=_positive_int, default=None, help="only the first N records")
    e.add_argument("--batch-size", type=_positive_int, default=16,
                   help="rows per batch (default 16); with packing a row holds several records")
    e.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack the records into rows of 512 tokens for the loss (default; the same loss, no "
                        "compute on padding)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=_cmd_eval)

    k = sub.add_parser("compare", help="learning against forgetting: full fine-tuning, LoRA, PiSSA, MoRA (and "
                                       "QPiSSA) over learning rates and ranks",
                       description="Runs pissa init + pissa train for every (method, rank, lr), measures each "
                                   "checkpoint (target exact match and loss; loss and KL on general text; a "
                                   "knowledge probe) and writes OUT/results.jsonl, pareto.png, lr.png, report.md. "
                                   "Run it again to continue: finished runs are reused.")
    k.add_argument("model", nargs="?", default=None,
                   help="the base model, as for pissa init (default: the preset's)")
    k.add_argument("--data", default=None, help="target training data, .jsonl")
    k.add_argument("--eval-data", default=None, help="held-out target data, .jsonl (prompt/completion or messages)")
    k.add_argument("--out", required=True, help="output folder")
    k.add_argument("--preset", default=None, help="smollm2: the documented SmolLM2-135M sweep (about an hour on "
                                                  "2 CPU cores with torch); other options override it")
    k.add_argument("--methods", default=None, help="comma-separated: full,lora,pissa,mora,qpissa")
    k.add_argument("--lrs", default=None, help="comma-separated learning rates (default 2e-5,2e-4)")
    k.add_argument("--ranks", default=None, help="comma-separated adapter ranks (default 16)")
    k.add_argument("--steps", type=_positive_int, default=None, help="training steps per run (default 100)")
    k.add_argument("--eval-at", default=None, help="comma-separated steps to measure (default: half and the end)")
    k.add_argument("--batch-size", type=_positive_int, default=None, help="sequences per step (default 4)")
    k.add_argument("--max-seq-len", type=_positive_int, default=None, help="tokens per sequence (default 256)")
    k.add_argument("--eval-limit", type=_positive_int, default=None, help="target records measured (default 32)")
    k.add_argument("--general-tokens", type=_positive_int, default=None,
                   help="tokens of general text measured (default 2048)")
    k.add_argument("--probe-limit", type=_non_negative_int, default=None,
                   help="probe questions measured (default: all)")
    k.add_argument("--backend", default="auto", help="torch or mlx (default: mlx on Apple silicon, else torch)")
    k.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoints (by default deleted once measured)")
    k.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    k.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    k.set_defaults(func=_cmd_compare)

    g = sub.add_parser("generate", help="one greedy answer to a prompt")
    _inference_args(g)
    g.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    g.set_defaults(func=_cmd_generate)
    return p


def _dist_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--dist-timeout", type=_number, default=None, metavar="SECONDS",
                   help="under torchrun or mlx.launch: fail the job when a rank waits this long for the others "
                        "(default 600)")


def _inference_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("model_dir", help="a model folder or Hub id (a pissa init folder uses its pissa_init adapter)")
    q.add_argument("--adapter", default=None, help="adapter to apply (default: MODEL_DIR/pissa_init if present)")
    q.add_argument("--backend", default="auto", help="torch or mlx (default: mlx on Apple silicon, else torch)")
    q.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    q.add_argument("--max-new-tokens", type=_positive_int, default=64, help="answer length cap (default 64)")


def _kind_options(args: argparse.Namespace, kind: str) -> dict:
    """The kind options given on the command line (--mora-type ...), each checked to be the kind's."""
    given = {}
    for name, (owner, _) in kinds.options().items():
        value = getattr(args, name)
        if value is None:
            continue
        if owner != kind:
            raise PissaError(f"--{name.replace('_', '-')} is an option of --kind {owner}, not of --kind {kind}")
        given[name] = value
    return given


def _cmd_init(args: argparse.Namespace) -> int:
    from pissa.adapters.spec import AdapterSpec, parse_targets
    from pissa.jobs.init import run_init
    from pissa.numeric.qpissa import DEFAULT_ITERS
    from pissa.studies import stepzero

    # QPiSSA's defaults differ: at rank 16 and one iteration it keeps little more of the model's
    # function than QLoRA does (docs/benchmarks.md); explicit values are always kept.
    rank = args.rank or (QPISSA_RANK if args.quantize is not None else DEFAULT_RANK)
    quant_iters = args.quant_iters or DEFAULT_ITERS
    kind = kinds.init_alias(args.init) or args.kind  # --init mora: the kind of old
    spec = AdapterSpec(rank=rank, alpha=args.alpha, use_rslora=args.rslora,
                       targets=parse_targets(args.targets), kind=args.kind, init=args.init, niter=args.niter,
                       oversampling=args.oversampling, seed=args.seed, dtype=args.dtype,
                       compute_dtype=args.compute_dtype, options=_kind_options(args, kind),
                       rank_pattern=_pattern(args.rank_pattern, int, "rank-pattern"),
                       alpha_pattern=_pattern(args.alpha_pattern, float, "alpha-pattern"))
    if spec.kind == "mora" and (args.alpha is not None or args.rslora):
        print("pissa: note: MoRA's update has no scale (it is 1); --alpha and --rslora are ignored", file=sys.stderr)
    scheme = None
    if args.quantize is not None:
        from pissa.numeric.quant import scheme as make_scheme

        scheme = make_scheme(args.quantize, args.group_size)
    group = dist.current(args.dist_timeout)
    summary = run_init(args.model, args.out, spec, backend=args.backend, device=args.device,
                       force=args.force, progress=not args.no_progress, svd_batch=args.svd_batch,
                       quantize=scheme, quant_iters=quant_iters, group=group,
                       measure=None if args.no_kl else functools.partial(stepzero.measure_init, force=args.kl))
    if group.rank != 0:
        return 0
    if summary.quant_table:
        print(summary.quant_table)
    if summary.kl_line:
        print(summary.kl_line)
    print(summary.line())
    return 0


def _training_backend(name: str) -> str:
    import platform

    from pissa.numeric.ops import available_backends

    have = [b for b in available_backends() if b != "numpy"]
    if name == "auto":
        if "mlx" in have and (sys.platform == "darwin" and platform.machine() == "arm64"
                              or dist.launch()[0] == "mlx.launch"):
            return "mlx"
        name = "torch"
    if name not in ("torch", "mlx"):
        raise PissaError(f"unknown backend {name!r} for this command; choose torch or mlx")
    if name not in have:
        raise PissaError(f"the {name} backend is not available; install it with: pip install 'pissa[{name}]'")
    return name


def _cmd_train(args: argparse.Namespace) -> int:
    from pissa.files.loaders import init_folder
    from pissa.training.run import TrainConfig
    from pissa.training.train import train

    backend = _training_backend(args.backend)
    model_dir = init_folder(args.model_dir)  # a Hub id only when its model holds pissa_init/
    batch_size = args.batch_size if args.batch_size is not None or args.batch_tokens else 4
    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, packing=args.packing, batch_size=batch_size,
                      batch_tokens=args.batch_tokens,
                      grad_accum=args.grad_accum, lr=args.lr,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm, max_seq_len=args.max_seq_len, seed=args.seed,
                      eval_every=args.eval_every, save_every=args.save_every,
                      save_at=_numbers(args.save_at, int, "save-at") or (), keep_checkpoints=args.keep_checkpoints,
                      precision=args.precision, grad_checkpointing=args.grad_checkpointing, log_every=args.log_every,
                      compile=args.compile)
    group = dist.current(args.dist_timeout)
    s = train(backend, model_dir, args.data, args.out, cfg, eval_data=args.eval_data, adapter=args.adapter,
              device=args.device, resume=args.resume, force=args.force, progress=not args.no_progress,
              shard=args.shard, dropout=args.dropout)
    if group.rank != 0:
        return 0
    ev = f", eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""
    print(f"pissa train: {s['steps']} steps, loss {s['loss']:.4f}{ev}, {s['tokens_per_s']:,.0f} tokens/s, "
          f"{s['seconds']:.1f} s -> {s['out']}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pissa.jobs.convert import gguf_lora, to_lora, vllm_line
    from pissa.files.formats.hf import atomic_dir
    from pissa.files.formats.peft import load_adapter, save_adapter

    fmt = args.format or ("gguf" if args.out.lower().endswith(".gguf") else "peft")
    if fmt not in ("peft", "mlx-lm", "gguf"):
        raise PissaError(f"unknown --format {fmt!r}; choose peft, mlx-lm or gguf")
    if fmt == "gguf":
        lora = gguf_lora(args.initial, args.trained, args.out, gguf_type=args.gguf_type or "f32", model=args.model,
                         base=args.base, force=args.force)
        which = "trained adapter" if args.base == "residual" else "LoRA"
        print(f"pissa convert: rank-{lora.spec.rank} {which} over {len(lora.factors)} modules (alpha "
              f"{lora.spec.alpha:g}) for the {args.base} model's GGUF -> {args.out} (llama.cpp: llama-cli -m "
              f"{args.base.upper()}.gguf --lora {args.out})")
        return 0
    if args.gguf_type or args.model or args.base != "original":
        raise PissaError("--gguf-type, --model and --base are options of --format gguf")
    lora = to_lora(load_adapter(args.initial) if args.initial else None, load_adapter(args.trained))
    with atomic_dir(Path(args.out), args.force) as tmp:
        save_adapter(tmp, lora)
        if args.format == "mlx-lm":
            from pissa.files.formats.mlx_lm import FOLDER, save_mlx_adapter

            save_mlx_adapter(tmp / FOLDER, lora)
    where = f" (mlx-lm: {Path(args.out) / 'mlx_lm'})" if args.format == "mlx-lm" else ""
    print(f"pissa convert: rank-{lora.spec.rank} LoRA over {len(lora.factors)} modules "
          f"(alpha {lora.spec.alpha:g}) for the original model -> {args.out}{where}")
    print(vllm_line(lora, args.out))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from pissa.jobs.merge import run_merge

    n = run_merge(args.model, args.adapter, args.out, force=args.force, dtype=args.dtype, gguf_type=args.gguf_type)
    what = f"merged {n} modules" if args.adapter else "no adapter, the model as it is"
    print(f"pissa merge: {what} -> {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from pissa.studies.evaluate import evaluate

    r = evaluate(_training_backend(args.backend), args.model_dir, args.data, adapter=args.adapter,
                 device=args.device, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                 limit=args.limit, progress=not args.no_progress, packing=args.packing)
    print(f"pissa eval: exact match {r['accuracy']:.1%} ({round(r['accuracy'] * r['n'])}/{r['n']}), "
          f"loss {r['loss']:.4f}")
    for ex in r["examples"]:
        print(f"  e.g. {ex!r}")
    print(json.dumps({k: v for k, v in r.items() if k != "examples"}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pissa.studies.evaluate import answer

    print(answer(_training_backend(args.backend), args.model_dir, args.prompt, adapter=args.adapter,
                 device=args.device, max_new_tokens=args.max_new_tokens))
    return 0


def _pattern(text: str | None, kind, name: str) -> dict:
    """"q_proj=8,v_proj=4" -> {"q_proj": 8, "v_proj": 4} (the first "=" of each item splits it)."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        try:
            out[key.strip()] = kind(value)
        except ValueError:
            eq = ""
        if not eq or not key.strip():
            raise PissaError(f"--{name} takes NAME=VALUE pairs separated by commas, e.g. q_proj=8,v_proj=4; got {item!r}")
    return out


def _numbers(text: str | None, kind, name: str):
    if text is None:
        return None
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PissaError(f"--{name} takes comma-separated {kind.__name__}s, got {text!r}") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from pissa.studies.compare import PRESETS, Grid, run_compare

    preset: dict = {}
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise PissaError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = dict(PRESETS[args.preset])
    given = {"methods": _numbers(args.methods, str, "methods"), "lrs": _numbers(args.lrs, float, "lrs"),
             "ranks": _numbers(args.ranks, int, "ranks"), "eval_at": _numbers(args.eval_at, int, "eval-at"),
             "steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
             "eval_limit": args.eval_limit, "general_tokens": args.general_tokens, "probe_limit": args.probe_limit}
    fields = {k: v for k, v in preset.items() if k in Grid.__dataclass_fields__}
    fields.update({k: v for k, v in given.items() if v is not None})
    model = args.model or preset.get("model")
    data, eval_data = args.data or preset.get("data"), args.eval_data or preset.get("eval_data")
    if not (model and data and eval_data):
        raise PissaError("pissa compare needs MODEL, --data and --eval-data (or --preset smollm2)")
    report = run_compare(model, data, eval_data, args.out, Grid(**fields), backend=_training_backend(args.backend),
                         force=args.force, progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints)
    print(f"pissa compare: report in {report}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Our own warnings are for users: one line, no source location.
    from pissa.jobs.convert import QuantizedBaseWarning

    if issubclass(category, QuantizedBaseWarning):
        print(f"pissa: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _rank() -> int:
    try:
        return dist.launch()[1]
    except PissaError:  # a broken launch environment: say so from here
        return 0


def _report(e: PissaError) -> None:
    """One line per job: rank 0 says what every rank found; another rank speaks only for what it
    alone saw (its own failure in pissa.dist.agree, or losing contact)."""
    if isinstance(e, PeerFailed):
        return
    if _rank() == 0 or isinstance(e, LostContact) or getattr(e, "rank_local", False):
        print(f"pissa: error: {e}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.showwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        launcher, _, size = dist.launch()
        if size > 1 and args.command not in DISTRIBUTED:
            raise PissaError(f"pissa {args.command} runs in one process, but {launcher} started {size}: "
                             f"run it without {launcher}")
        return args.func(args)
    except PissaError as e:
        _report(e)
        if isinstance(e, LostContact):
            # The process group may be mid-operation; its teardown at exit can abort with a core
            # dump and more lines (seen with gloo). The message is out: leave now.
            sys.stdout.flush()
            os._exit(EXIT_USAGE)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if _rank() == 0:  # Ctrl-C reaches every rank of a launcher; one line is enough
            print("pissa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
