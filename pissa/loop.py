"""The training run both backends share, minus the framework: set-up (tokenizer, data, run folder,
resume), the step loop (schedule, micro-batches, NaN and Ctrl-C handling, eval and checkpoint
cadence, metrics, progress bar) and the final outputs (adapter, its plain LoRA, loss.png, summary).

A backend's train() (pissa_torch.train, pissa_mlx.train) builds its model and optimizer from a
Run and hands run_loop() a Steps object: the five things only a framework can do.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from pissa.data import Dataset, batch_indices, collate, load_dataset, load_tokenizer, pad_id
from pissa.errors import PissaError
from pissa.formats import peft as peft_format
from pissa.formats.peft import Adapter
from pissa.layouts import BASE_MODEL_INFO
from pissa.training import RunDir, TrainConfig, init_fingerprint, initial_adapter, lr_at, save_config

# pissa_config.json fields of the init that every adapter of the run carries on.
_INHERITED = ("shapes", *BASE_MODEL_INFO)


@dataclass
class Run:
    """Everything a backend needs to build its model and optimizer for one `pissa train`."""

    cfg: TrainConfig
    model_dir: Path
    folder: RunDir
    tokenizer: Any
    train_set: Dataset
    eval_set: Dataset | None
    pad: int
    start: Adapter            # the adapter to load: the init's, --adapter's, or the checkpoint's
    init: Adapter             # the pissa_init it descends from (conversion needs it)
    step: int                 # 0, or the checkpoint's step with --resume
    checkpoint: Path | None   # the checkpoint resumed from (its optimizer state is the backend's)
    info: dict                # pissa_config.json fields of every adapter this run writes

    @property
    def spec(self):
        return self.start.spec


def prepare(model_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, *, backend: str,
            eval_data: str | Path | None = None, adapter: str | Path | None = None, resume: bool = False,
            force: bool = False, config: dict | None = None) -> Run:
    """Read and check everything a run needs before any framework work: the init folder, the
    adapter to start from, the data (tokenised with the model's own tokenizer), and the run folder
    (with --resume, its last checkpoint). Writes RUN_DIR/config.json.

    Raises:
        PissaError: a model folder without pissa_init, an adapter of another init, bad data, or a
            run folder that is not empty (without --resume / --force) or has no checkpoint to resume.
    """
    model_dir = Path(model_dir)
    start, init = initial_adapter(model_dir, adapter)
    tokenizer = load_tokenizer(model_dir)
    train_set = load_dataset(data, tokenizer, cfg.max_seq_len)
    eval_set = load_dataset(eval_data, tokenizer, cfg.max_seq_len) if eval_data else None
    for ds in filter(None, (train_set, eval_set)):
        if ds.truncated:
            print(f"pissa train: {ds.truncated} of {len(ds.examples)} records in {ds.path} were cut to "
                  f"--max-seq-len {cfg.max_seq_len}", file=sys.stderr)
    folder = RunDir(out, resume=resume, force=force)
    step, checkpoint = 0, folder.latest() if resume else None
    if checkpoint is not None:
        start = peft_format.load_adapter(checkpoint / "adapter")
        step = int(json.loads((checkpoint / "state.json").read_text())["step"])
        folder.truncate_metrics(step)
    info = {"role": "trained", "init_fingerprint": init_fingerprint(init), "source": init.info.get("source"),
            **{k: init.info[k] for k in _INHERITED if k in init.info}}
    save_config(folder, cfg, {"backend": backend, "model_dir": str(model_dir.absolute()), "data": str(data),
                              "spec": start.spec.to_dict(), **(config or {})})
    return Run(cfg, model_dir, folder, tokenizer, train_set, eval_set, pad_id(tokenizer), start, init, step,
               checkpoint, info)


class Steps(Protocol):
    """The framework half of a run (one model, one optimizer, one device)."""

    def forward_backward(self, batch: dict[str, np.ndarray], accum: int) -> float:
        """Add the gradient of (mean token loss of this micro-batch) / accum to the accumulated
        gradients (batch: pissa.data.collate's arrays). Returns the loss itself."""

    def update(self, lr: float) -> None:
        """Clip the accumulated gradients, take one optimizer step at `lr`, clear the gradients."""

    def eval_loss(self, data: Dataset) -> float:
        """Mean token loss over a dataset, in eval mode (and back to train mode after)."""

    def adapter(self) -> Adapter:
        """The model's adapter now, in the spec's storage dtype, with the run's info."""

    def save_state(self, folder: Path) -> None:
        """Write the optimizer state into a checkpoint folder (read back on --resume)."""


def run_loop(run: Run, steps: Steps, *, desc: str, progress: bool = True) -> dict:
    """Train from run.step to run.cfg.steps, then write RUN_DIR/adapter, RUN_DIR/lora (when the
    adapter kind has an exact LoRA form) and loss.png; for full fine-tuning RUN_DIR/model.

    Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt. Both backends draw the same
    micro-batches in the same order (pissa.data.batch_indices), so runs are comparable.

    Returns:
        A summary dict (steps, final loss, eval loss, tokens/s, seconds, run folder).

    Raises:
        PissaError: when the loss becomes NaN or infinite (the last good checkpoint is kept).
    """
    cfg, folder, data = run.cfg, run.folder, run.train_set.examples
    step = run.step

    def save(at: int) -> Path:
        return folder.save_checkpoint(at, steps.adapter(), steps.save_state, {"backend": desc})

    bar = tqdm(total=cfg.steps, initial=step, desc=f"pissa train ({desc})", disable=not progress, file=sys.stderr)
    tokens_seen, t0, loss_value, last_eval = 0, time.perf_counter(), float("nan"), None
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step * cfg.grad_accum + micro)
                batch = collate([data[i] for i in idx], run.pad)
                loss_sum += steps.forward_backward(batch, cfg.grad_accum)
                tokens_seen += int(batch["attention_mask"].sum())
            loss_value = loss_sum / cfg.grad_accum
            if not math.isfinite(loss_value):
                kept = folder.latest()
                raise PissaError(f"the loss became {loss_value} at step {step + 1}; stopped. Last good checkpoint: "
                                 f"{kept if kept else 'none (use --save-every)'}; lower --lr and --resume or restart")
            steps.update(lr)
            step += 1
            elapsed = time.perf_counter() - t0
            folder.log({"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_seen / elapsed})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:,.0f}")
            bar.update(1)
            if run.eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                last_eval = steps.eval_loss(run.eval_set)
                folder.log({"step": step, "eval_loss": last_eval})
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        saved = save(step)
        print(f"pissa train: interrupted; saved {saved} (step {step}); continue with --resume", file=sys.stderr)
        raise
    bar.close()

    if run.eval_set:
        last_eval = steps.eval_loss(run.eval_set)
        folder.log({"step": step, "eval_loss": last_eval})
    save(step)
    folder.finish(steps.adapter(), run.init, run.model_dir)
    folder.plot()
    elapsed = time.perf_counter() - t0
    return {"steps": step, "loss": loss_value, "eval_loss": last_eval, "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            "seconds": elapsed, "out": str(folder.path)}
