"""`pissa train --backend torch`: one readable loop, top to bottom.

Set-up (data, model, adapter, optimizer, resume), then steps of gradient accumulation,
clipping, AdamW, logging, eval and checkpoints, then the final adapter and its converted LoRA.
Everything that is not framework code (data, schedule, run folder) comes from pissa.data and
pissa.training, shared with the MLX loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pissa.data import IGNORE, Dataset, batch_indices, collate, load_dataset, pad_id
from pissa.errors import PissaError
from pissa.formats import peft as peft_format
from pissa.training import RunDir, TrainConfig, initial_adapter, lr_at, save_config
from pissa_torch.api import adapter_of, apply
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


def token_loss(model, batch: dict[str, torch.Tensor], autocast) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the label tokens (position t predicts token t+1), and their count."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    return loss, int((labels != IGNORE).sum())


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, data: Dataset, batch_size: int, pad: int, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.examples), batch_size):
        batch = to_device(collate(data.examples[i:i + batch_size], pad), device)
        loss, n = token_loss(model, batch, autocast)
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def train(model_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, *,
          eval_data: str | Path | None = None, adapter: str | Path | None = None, device: str | None = None,
          resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train the PiSSA adapter of a `pissa init` folder. See `pissa train --help`.

    Returns:
        A summary dict (steps, final loss, eval loss, tokens/s, seconds, run folder).

    Raises:
        PissaError: bad data or options (before any step runs), or a loss that became NaN/inf
            (after keeping the last good checkpoint).
    """
    from transformers import AutoTokenizer

    # ---------------------------------------------------------------- set-up
    dev = pick_device(device)
    autocast, precision = autocast_for(cfg.precision, dev)
    model_dir = Path(model_dir)
    start_adapter, init = initial_adapter(model_dir, adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = load_dataset(data, tokenizer, cfg.max_seq_len)
    eval_set = load_dataset(eval_data, tokenizer, cfg.max_seq_len) if eval_data else None
    for ds in filter(None, (train_set, eval_set)):
        if ds.truncated:
            print(f"pissa train: {ds.truncated} of {len(ds.examples)} records in {ds.path} were cut to "
                  f"--max-seq-len {cfg.max_seq_len}", file=sys.stderr)
    run = RunDir(out, resume=resume, force=force)
    step = 0
    checkpoint = run.latest() if resume else None
    if checkpoint is not None:
        start_adapter = peft_format.load_adapter(checkpoint / "adapter")
        step = int(json.loads((checkpoint / "state.json").read_text())["step"])
        run.truncate_metrics(step)
    spec = start_adapter.spec
    info = {"role": "trained", "init_fingerprint": init.info["fingerprint"], "source": init.info.get("source")}
    save_config(run, cfg, {"backend": "torch", "device": str(dev), "precision": precision,
                           "model_dir": str(model_dir.absolute()), "data": str(data), "spec": spec.to_dict()})

    torch.manual_seed(cfg.seed)
    model = load_base(model_dir, dtype=torch.float32, device=dev)  # plain or QPiSSA-quantised residual
    apply(model, spec, start_adapter)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    if checkpoint is not None:
        opt.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=dev))
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    pad = pad_id(tokenizer)

    def save(at: int) -> Path:
        return run.save_checkpoint(at, adapter_of(model, spec, info),
                                   lambda folder: torch.save(opt.state_dict(), folder / "optimizer.pt"),
                                   {"backend": "torch"})

    # ---------------------------------------------------------------- steps
    bar = tqdm(total=cfg.steps, initial=step, desc="pissa train (torch)", disable=not progress, file=sys.stderr)
    tokens_seen, t0, loss_value, last_eval = 0, time.perf_counter(), float("nan"), None
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train_set.examples), cfg.batch_size, cfg.seed, step * cfg.grad_accum + micro)
                batch = to_device(collate([train_set.examples[i] for i in idx], pad), dev)
                loss, _ = token_loss(model, batch, autocast)
                scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
                tokens_seen += int(batch["attention_mask"].sum())
            loss_value = loss_sum / cfg.grad_accum
            if not math.isfinite(loss_value):
                kept = run.latest()
                raise PissaError(f"the loss became {loss_value} at step {step + 1}; stopped. Last good checkpoint: "
                                 f"{kept if kept else 'none (use --save-every)'}; lower --lr and --resume or restart")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            run.log({"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_seen / elapsed})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:,.0f}")
            bar.update(1)
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                last_eval = eval_loss(model, eval_set, cfg.batch_size, pad, dev, autocast)
                run.log({"step": step, "eval_loss": last_eval})
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        saved = save(step)
        print(f"pissa train: interrupted; saved {saved} (step {step}); continue with --resume", file=sys.stderr)
        raise
    bar.close()

    # ---------------------------------------------------------------- final outputs
    if eval_set:
        last_eval = eval_loss(model, eval_set, cfg.batch_size, pad, dev, autocast)
        run.log({"step": step, "eval_loss": last_eval})
    save(step)
    run.finish(adapter_of(model, spec, info), init)
    run.plot()
    elapsed = time.perf_counter() - t0
    return {"steps": step, "loss": loss_value, "eval_loss": last_eval, "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            "seconds": elapsed, "out": str(run.path)}
