"""`pissa train` on either backend: the set-up both share (launcher, device, precision, the run,
the model with its adapter), then the backend's framework half (Backend.trainer) in the shared
step loop (pissa.training.loop)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from pissa import dist
from pissa.errors import PissaError
from pissa.files.models import load
from pissa.numeric.backend import get_backend, resolve_precision
from pissa.training.loop import prepare, run_loop
from pissa.training.run import TrainConfig


def train(backend: str, model_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, *,
          eval_data: str | Path | None = None, adapter: str | Path | None = None, device: str | None = None,
          resume: bool = False, force: bool = False, progress: bool = True, shard: bool = False,
          dropout: float | None = None) -> dict:
    """Train the adapter of a `pissa init` folder (any kind, QPiSSA included) on `backend`
    ("torch" or "mlx"). See `pissa train --help`.

    Under a launcher (torchrun for torch, mlx.launch for MLX) every rank runs this, data-parallel;
    with shard=True torch splits the model over the ranks (FSDP2).

    Returns:
        A summary dict (steps, final loss, eval loss, tokens/s, seconds, run folder).

    Raises:
        PissaError: bad data or options (before any step runs), a launcher of the other backend,
            or a loss that became NaN/inf (after keeping the last good checkpoint); LostContact
            when a rank dies or hangs.
    """
    be = get_backend(backend)
    group = dist.current()
    if group.launcher and group.launcher != be.launcher:
        other = "mlx" if be.name == "torch" else "torch"
        raise PissaError(f"started by {group.launcher}: train with --backend {other} there, or launch the {be.name} "
                         f"backend with {be.launcher}")
    if shard and not be.shards:
        raise PissaError(f"--shard is for the torch backend (FSDP2); {be.name} trains data-parallel: drop --shard")
    dev = be.device(device, group.local_rank if group.size > 1 else 0)
    accelerator, has_bf16 = be.accelerator(dev)
    precision = resolve_precision(cfg.precision, accelerator, has_bf16)
    if precision != "fp32" and not accelerator:
        print(f"pissa train: note: --precision {precision} on a CPU halves the frozen weights' memory, but a CPU "
              "without half-precision matrix units (AVX512-BF16, AMX) trains many times slower than in fp32, the "
              "CPU's default (85x per matmul measured on an AVX2 machine)", file=sys.stderr)
    if cfg.compile and be.name != "torch":  # torch.compile; MLX compiles its step anyway
        print(f"pissa train: note: --compile is torch.compile, for the torch backend; {be.name} always compiles "
              "its step", file=sys.stderr)
    split = shard and group.size > 1
    if shard and not split:
        print("pissa train: note: --shard splits a model over the ranks of torchrun; one process trains it whole",
              file=sys.stderr)
    run = prepare(model_dir, data, out, cfg, backend=be.name, eval_data=eval_data, adapter=adapter, resume=resume,
                  force=force, group=group, dropout=dropout, unpackable=be.unpackable(model_dir),
                  config={"device": str(dev), "precision": precision, **({"shard": True} if split else {})})
    model, _ = load(be, run.model_dir, run.start, device=dev, precision=precision)
    return run_loop(run, be.trainer(run, model, dev, precision, split), desc=be.name, progress=progress)
