"""`pissa train --backend torch`: the framework half of a run, top to bottom.

The model (the init folder with its adapter), AdamW, and the five framework steps pissa.training.loop asks
for: a micro-batch's forward and backward, the clipped optimizer step, the eval loss, the adapter
now, and the optimizer state for checkpoints. Everything else (data, schedule, run folder, resume,
NaN and Ctrl-C handling, eval and save cadence, the final adapter and LoRA) is pissa.training.loop's,
shared with the MLX backend.

Under torchrun the model is wrapped for DDP (a replica per rank) or, with shard=True, split with
FSDP2's fully_shard (pissa_torch.dist); each rank runs its rows of every batch, and the loss is
scaled so that the reduced gradient is the one-process gradient of the global batch.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pissa import dist
from pissa.training.data import IGNORE, Dataset, collate
from pissa.errors import PissaError
from pissa.training.loop import prepare, run_loop
from pissa.training.run import TrainConfig
from pissa_torch.api import adapter_of, apply
from pissa_torch.dist import full_state, load_state, sync, wrap
from pissa_torch.quantized import load_base


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PissaError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def autocast_for(precision: str, device: torch.device):
    """bf16 (or fp16) autocast on CUDA; fp32 on the CPU, where autocast is slower than fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def token_loss(model, batch: dict[str, torch.Tensor], autocast, reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy over the label tokens (position t predicts token t+1): their mean, or with
    reduction="sum" their sum (0 for a batch without labels), and their count."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction=reduction)
    return loss, int((labels != IGNORE).sum())


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, data: Dataset, batch_size: int, pad: int, device, autocast) -> float:
    """Mean token loss over `data` in eval mode; the model goes back to the mode it was in."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.examples), batch_size):
        batch = to_device(collate(data.examples[i:i + batch_size], pad), device)
        loss, n = token_loss(model, batch, autocast, reduction="sum")
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def train(model_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, *,
          eval_data: str | Path | None = None, adapter: str | Path | None = None, device: str | None = None,
          resume: bool = False, force: bool = False, progress: bool = True, shard: bool = False) -> dict:
    """Train the adapter of a `pissa init` folder (PiSSA, LoRA, QPiSSA or MoRA). See `pissa train --help`.

    Under torchrun, data-parallel over the ranks (DDP), or with shard=True sharded (FSDP2).

    Returns:
        A summary dict (steps, final loss, eval loss, tokens/s, seconds, run folder).

    Raises:
        PissaError: bad data or options (before any step runs), or a loss that became NaN/inf
            (after keeping the last good checkpoint); LostContact when a rank dies or hangs.
    """
    group = dist.current()
    if group.launcher == "mlx.launch":
        raise PissaError("started by mlx.launch: train with --backend mlx there, or launch the torch backend "
                         "with torchrun")
    dev = pick_device(device)
    if group.size > 1 and dev.type == "cuda" and dev.index is None:  # each rank its own GPU
        dev = torch.device("cuda", group.local_rank % torch.cuda.device_count())
    autocast, precision = autocast_for(cfg.precision, dev)
    split = shard and group.size > 1
    if shard and not split:
        print("pissa train: note: --shard splits a model over the ranks of torchrun; one process trains it whole",
              file=sys.stderr)
    run = prepare(model_dir, data, out, cfg, backend="torch", eval_data=eval_data, adapter=adapter, resume=resume,
                  force=force, group=group,
                  config={"device": str(dev), "precision": precision, **({"shard": True} if split else {})})

    torch.manual_seed(cfg.seed)
    model = load_base(run.model_dir, dtype=torch.float32, device=dev)  # plain or QPiSSA-quantised residual
    apply(model, run.spec, run.start)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    with group.guard("wrapping the model"):
        net = wrap(model, group, dev, shard)
    params = [p for p in model.parameters() if p.requires_grad]  # after fully_shard: the sharded ones
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    if run.checkpoint is not None:
        load_state(opt, torch.load(run.checkpoint / "optimizer.pt", map_location=dev), params)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    ranks = group.size  # DDP and FSDP2 average over the ranks; the loop wants the sum

    class Steps:
        sharded = split  # the loop cannot save on Ctrl-C what only all ranks together hold
        micro = 0

        def forward_backward(self, batch, weight):
            self.micro = (self.micro + 1) % cfg.grad_accum
            with sync(net, last=self.micro == 0):
                total, _ = token_loss(net, to_device(batch, dev), autocast, reduction="sum")
                scaler.scale(total * (weight * ranks)).backward()
            return float(total.detach())

        def update(self, lr):
            for group_ in opt.param_groups:
                group_["lr"] = lr
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        def eval_loss(self, dataset):
            # FSDP2 gathers weights in the module's own hooks; DDP adds nothing to a no-grad forward.
            return eval_loss(model, dataset, cfg.batch_size, run.pad, dev, autocast)

        def adapter(self):
            return adapter_of(model, run.spec, run.info)

        def save_state(self, folder):
            state = full_state(opt) if split else opt.state_dict()
            if folder is not None:
                torch.save(state, folder / "optimizer.pt")

    return run_loop(run, Steps(), desc="torch", progress=progress)
