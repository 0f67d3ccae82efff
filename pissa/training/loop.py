"""The training run both backends share, minus the framework: set-up (tokenizer, data, run folder,
resume), the step loop (schedule, micro-batches, NaN and Ctrl-C handling, eval and checkpoint
cadence, metrics, progress bar) and the final outputs (adapter, its plain LoRA, loss.png, summary).

pissa.training.train sets a run up (prepare() here, then the model with its adapter) and asks the
backend for a Steps object around it (Backend.trainer: pissa_torch.train, pissa_mlx.train): the
three things only a framework can do. run_loop() drives it.

Under a launcher (torchrun, mlx.launch; pissa.dist) every rank runs this same loop. Each draws the
same global micro-batch and collates every size-th row of it (a rank left without a row gets a
filler row that carries no label); the loss is normalised by the label tokens of the whole step
(every micro-batch of it, on every rank), so the gradients summed over ranks and micro-batches
are exactly those of one process taking the step as one batch (up to float summation order).
Loss sums, eval sums and failure flags are summed over the ranks; tokens/s counts the global
batch. Only rank 0 writes the run folder; every rank reads the checkpoint it resumes from, so
--out must be on a filesystem all ranks see.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from pissa import dist
from pissa.adapters.adapter import BASE_MODEL_INFO, Adapter, init_fingerprint
from pissa.adapters.model import adapter_of
from pissa.errors import PissaError
from pissa.files.formats import peft as peft_format
from pissa.files.formats.hf import write_json
from pissa.files.tokenizer import load_tokenizer, pad_id
from pissa.numeric.loss import IGNORE
from pissa.training.batches import Plan, collate_rows
from pissa.training.data import Dataset, Example, file_sha256, load_dataset
from pissa.training.evaluation import eval_loss
from pissa.training.ledger import Ledger
from pissa.training.run import (CHECKPOINTS, DEFAULT_STEPS, RunDir, TrainConfig, initial_adapter, lr_at,
                                resume_mismatch, save_config)

# pissa_config.json fields of the init that every adapter of the run carries on.
_INHERITED = ("shapes", *BASE_MODEL_INFO)
DIVERGED = "diverged.json"  # RUN_DIR/diverged.json: the step and loss at which a run stopped on NaN/inf


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
    group: Any = dist.Solo()  # the ranks training together (pissa.dist)
    plan: Plan | None = None  # the micro-batches, epoch after epoch (pissa.training.batches)
    micro_batches: int = 0    # with --epochs (and no --steps): the micro-batches of those epochs, else 0

    @property
    def spec(self):
        return self.start.spec


def prepare(model_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, *, backend: str,
            eval_data: str | Path | None = None, adapter: str | Path | None = None, resume: bool = False,
            force: bool = False, config: dict | None = None, group: dist.Group | None = None,
            dropout: float | None = None, unpackable: str | None = None) -> Run:
    """Read and check everything a run needs before any framework work: the init folder, the
    adapter to start from, the data (tokenised with the model's own tokenizer), and the run folder
    (with --resume, its last checkpoint). Writes RUN_DIR/config.json.

    Under a launcher every rank reads the model and data; rank 0 alone makes the run folder (and
    chooses the checkpoint), and the others then read that checkpoint.

    Raises:
        PissaError: a model folder without pissa_init, an adapter of another init, bad data, a
            run folder that is not empty (without --resume / --force) or has no checkpoint to
            resume, or a global batch smaller than the number of ranks.
    """
    group = group or dist.current()
    if cfg.batch_size is not None and cfg.batch_size < group.size:
        raise PissaError(f"--batch-size {cfg.batch_size} is the global batch, split over {group.size} ranks; "
                         f"give at least {group.size}")
    model_dir = Path(model_dir)
    start, init = initial_adapter(model_dir, adapter)
    tokenizer = load_tokenizer(model_dir)
    train_set = load_dataset(data, tokenizer, cfg.max_seq_len)
    eval_set = load_dataset(eval_data, tokenizer, cfg.max_seq_len) if eval_data else None
    for ds in filter(None, (train_set, eval_set)):
        if ds.truncated and group.rank == 0:
            print(f"pissa train: {ds.truncated} of {len(ds.examples)} records in {ds.path} were cut to "
                  f"--max-seq-len {cfg.max_seq_len}", file=sys.stderr)
    mode = ("grouped" if unpackable else "packed") if cfg.packing else "padded"
    if cfg.packing and unpackable and group.rank == 0:
        print(f"pissa train: note: {unpackable}; batching by length instead of packing", file=sys.stderr)
    plan = Plan([len(e.input_ids) for e in train_set.examples], cfg.batch_size, cfg.max_seq_len, cfg.seed, mode,
                cfg.batch_tokens)
    micro_batches = plan.micro_batches(cfg.epochs) if cfg.epochs and cfg.steps is None else 0
    if cfg.steps is None:  # --epochs' micro-batches, in optimizer steps
        steps = -(-micro_batches // cfg.grad_accum) if micro_batches else DEFAULT_STEPS
        cfg = dataclasses.replace(cfg, steps=steps)
    start = _with_dropout(start, dropout)
    fingerprint = init_fingerprint(init)
    record = {"backend": backend, "model_dir": str(model_dir.absolute()), "data": str(Path(data).absolute()),
              "data_sha256": file_sha256(data), "init_fingerprint": fingerprint,
              "spec": start.spec.to_dict(), "batching": mode, **(config or {})}
    if group.size > 1:
        record["ranks"] = group.size

    def make_folder() -> tuple[RunDir, int]:
        folder = RunDir(out, resume=resume, force=force)
        written = folder.path / "config.json"
        if resume and written.is_file():  # the same run goes on, or nothing is written
            differs = resume_mismatch(json.loads(written.read_text()), {"train": dataclasses.asdict(cfg), **record})
            if differs:
                raise PissaError(f"--resume continues the run in {folder.path} as it was started, and these differ: "
                                 f"{differs}; pass the run's own options (its config.json), or start another run "
                                 "with --out elsewhere (--adapter RUN_DIR/adapter starts from its result)")
        checkpoint = folder.latest() if resume else None
        step = int(json.loads((checkpoint / "state.json").read_text())["step"]) if checkpoint else -1
        if checkpoint is not None:
            folder.truncate_metrics(step)
        save_config(folder, cfg, record)
        return folder, step

    made = dist.agree(group, make_folder, what="setting up the run folder", on=(0,))
    # Every rank resumes from the checkpoint rank 0 chose (-1: none), found by its step.
    with group.guard("setting up the run folder"):
        step = int(group.all_sum([made[1] if made else 0])[0])
    folder = made[0] if made else RunDir.view(out)
    checkpoint = folder.path / CHECKPOINTS / f"step-{step:06d}" if step >= 0 else None

    def read_checkpoint() -> Adapter | None:
        if checkpoint is not None and not (checkpoint / "state.json").is_file():
            raise PissaError(f"rank {group.rank} cannot see {checkpoint}, which rank 0 resumes from; --out must be "
                             "on a filesystem every rank sees")
        return peft_format.load_adapter(checkpoint / "adapter") if checkpoint is not None else None

    resumed = _with_dropout(dist.agree(group, read_checkpoint, what="reading the checkpoint"), dropout)
    info = {"role": "trained", "init_fingerprint": fingerprint, "source": init.info.get("source"),
            **{k: init.info[k] for k in _INHERITED if k in init.info}}
    return Run(cfg, model_dir, folder, tokenizer, train_set, eval_set, pad_id(tokenizer), resumed or start, init,
               max(step, 0), checkpoint, info, group, plan, micro_batches)


def _with_dropout(adapter: Adapter | None, dropout: float | None) -> Adapter | None:
    """The adapter with `pissa train --dropout` in its spec (PEFT's lora_dropout), when given."""
    if adapter is None or dropout is None:
        return adapter
    return dataclasses.replace(adapter, spec=dataclasses.replace(adapter.spec, dropout=dropout))


class Steps(Protocol):
    """The framework half of a run (one model, one optimizer, one device)."""

    sharded: bool  # whether only all ranks together hold the model (FSDP2): Ctrl-C cannot save it then
    backend: Any   # the Backend (pissa.numeric.backend) and the model with its adapter, as evals run it
    model: Any     # and as the loop reads its adapter (pissa.adapters.model.adapter_of) for checkpoints
    precision: str

    def forward_backward(self, batch: dict[str, np.ndarray], weight: float, draw: int, last: bool) -> float:
        """Add the gradient of weight * (sum of this micro-batch's token losses) to the accumulated
        gradients, summed over the ranks (a backend whose reduction averages, as DDP's and
        mlx.nn.average_gradients do, multiplies by the number of ranks first). batch: this rank's
        rows of pissa.training.batches.collate_rows' arrays (possibly a filler without labels).
        weight: 1 / the step's labelled tokens over all micro-batches and ranks. draw: the seed of
        this micro-batch's random draws (dropout), a function of --seed, the micro-batch and the
        rank, so that a resumed run draws what an uninterrupted one would. last: whether this is
        the step's last micro-batch, after which the ranks' gradients must be reduced (DDP's and
        FSDP2's sync; the others skip it). Returns this rank's sum of token losses."""

    def update(self, lr: float) -> None:
        """Clip the accumulated gradients, take one optimizer step at `lr`, clear the gradients."""

    def save_state(self, folder: Path | None) -> None:
        """Write the optimizer state, whole (the same file on any number of ranks), and whatever
        else a resumed run needs to continue exactly (a loss scaler's state, the random state of
        the dropout), into a checkpoint folder (read back on --resume). Called on every rank;
        folder is None on the ranks that do not write."""


def run_loop(run: Run, steps: Steps, *, desc: str, progress: bool = True) -> dict:
    """Train from run.step to run.cfg.steps, then write RUN_DIR/adapter, RUN_DIR/lora (when the
    adapter kind has an exact LoRA form) and loss.png; for full fine-tuning RUN_DIR/model.

    Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt (under a launcher, rank 0 saves its
    replica; a sharded model, whose state only all ranks together hold, keeps the last
    checkpoint). Both backends draw the same micro-batches in the same order
    (run.plan, pissa.training.batches), so runs are comparable.

    Returns:
        A summary dict (steps, final loss, eval loss, tokens/s, seconds, run folder).

    Raises:
        PissaError: when the loss becomes NaN or infinite (the last good checkpoint is kept).
        LostContact: when another rank dies or stops answering (pissa.dist).
    """
    cfg, folder, data, group = run.cfg, run.folder, run.train_set.examples, run.group
    writes = group.rank == 0
    step = run.step

    def save(at: int) -> Path:
        # float32 master weights, the trainable parameters as they are (every rank: gathering a
        # sharded adapter is a collective); RUN_DIR/adapter is in the spec's storage dtype
        adapter = adapter_of(steps.backend, steps.model, run.spec, run.info, "float32")
        if writes:
            saved = folder.save_checkpoint(at, adapter, steps.save_state, {"backend": desc})
            folder.prune(cfg.keep_checkpoints)  # the older ones go only now that this one is complete
            return saved
        steps.save_state(None)
        return folder.path / CHECKPOINTS / f"step-{at:06d}"

    # Per example: its tokens, and its labelled next tokens (a packed row's later examples lose the
    # label of their first token, as a row's first token has none: collate_rows).
    sizes = np.array([len(e.input_ids) for e in data])
    labels = np.array([sum(label != IGNORE for label in e.labels[1:]) for e in data])
    bar = tqdm(total=cfg.steps, initial=step, desc=f"pissa train ({desc})", disable=not (progress and writes),
               file=sys.stderr)

    def diverged(at: int, loss: float) -> str:
        kept = folder.latest()
        message = (f"the loss became {loss} at step {at}; stopped. Last good checkpoint: "
                   f"{kept if kept else 'none (use --save-every)'}; lower --lr and --resume or restart")
        if writes:  # what a caller (pissa compare) reads, rather than parsing the message
            write_json(folder.path / DIVERGED, {"step": at, "loss": str(loss), "message": message})
        return message

    def show(loss: float, lr: float, rate: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")

    ledger = Ledger(group, folder.log if writes else (lambda row: None), show, diverged)
    last_eval = None
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            # --epochs: the last step takes what is left of the last epoch, so that each example is
            # seen once an epoch (the micro-batches an epoch holds need not divide by --grad-accum)
            micros = min(cfg.grad_accum, run.micro_batches - step * cfg.grad_accum) if run.micro_batches \
                else cfg.grad_accum
            first = step * cfg.grad_accum
            plans = [run.plan.micro(first + micro) for micro in range(micros)]
            # The step's loss is the mean over every labelled token of all its micro-batches and ranks:
            # each micro-batch's sum is divided by the step's count, known here before any runs, so
            # --grad-accum k is a k times larger batch (not a mean of per-micro-batch means).
            count = sum(int(labels[row].sum()) for rows in plans for row in rows)
            sums = []
            with group.guard(f"step {step + 1}"):
                for micro, rows in enumerate(plans):
                    draw = int(np.random.default_rng([cfg.seed, first + micro, group.rank]).integers(2**31))
                    sums.append(steps.forward_backward(rank_batch(data, rows, run.pad, group), 1.0 / max(count, 1),
                                                       draw, last=micro == micros - 1))
                steps.update(lr)
            step += 1
            ledger.add(step, lr, sum(int(sizes[row].sum()) for rows in plans for row in rows), count, sums)
            bar.update(1)
            evals = bool(run.eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps)
            saves = folder.saves(step, cfg) and step < cfg.steps
            if step % cfg.log_every == 0 or evals or saves:  # read the losses before anything depends on them
                ledger.flush()
            if evals:
                last_eval = evaluate(run, steps)
                if writes:
                    folder.log({"step": step, "eval_loss": last_eval})
            if saves:
                with group.guard(f"saving step {step}"):
                    save(step)
        ledger.flush()
    except KeyboardInterrupt:
        bar.close()
        if group.size == 1:
            ledger.flush()  # the unread losses are logged (and checked) before their state is saved
        if group.size == 1 or (writes and not steps.sharded):
            saved = save(step)
            print(f"pissa train: interrupted; saved {saved} (step {step}); continue with --resume", file=sys.stderr)
        elif writes:
            print(f"pissa train: interrupted; the last checkpoint is {folder.latest()}; continue with --resume",
                  file=sys.stderr)
        raise
    bar.close()

    if run.eval_set:
        last_eval = evaluate(run, steps)
        if writes:
            folder.log({"step": step, "eval_loss": last_eval})
    with group.guard("saving the final adapter"):
        # The final step gets a checkpoint only when asked for (a finished run needs none to resume);
        # RUN_DIR/adapter holds the result, in the storage dtype.
        if folder.saves(step, cfg):
            save(step)
        final = adapter_of(steps.backend, steps.model, run.spec, run.info)

    def finish() -> None:
        folder.finish(final, run.init, run.model_dir)
        folder.plot()

    dist.agree(group, finish, what="writing the run folder", on=(0,))
    elapsed = time.perf_counter() - ledger.t0
    return {"steps": step, "loss": ledger.loss, "eval_loss": last_eval,
            "tokens_per_s": ledger.tokens_seen / max(elapsed, 1e-9), "seconds": elapsed, "out": str(folder.path)}


def rank_batch(data: list[Example], rows: list[list[int]], pad: int, group: dist.Group) -> dict[str, np.ndarray]:
    """This rank's rows of a global micro-batch (every size-th row), collated; only those are. A rank
    whose share is empty (an epoch's last micro-batch can hold fewer rows than there are ranks) gets
    the first row as a filler that carries no label, so that it still runs every collective and
    adds nothing to the loss or the gradients."""
    mine = rows[group.rank::group.size]
    if mine:
        return collate_rows(data, mine, pad)
    batch = collate_rows(data, rows[:1], pad)
    batch["labels"][:] = IGNORE
    return batch


def evaluate(run: Run, steps: Steps) -> float:
    """The eval loss over run.eval_set. Under a launcher each rank takes every size-th record,
    padded with unlabelled copies so that every rank runs as many batches (a sharded forward is
    a collective), and the token-weighted sums are added over the ranks."""
    group = run.group

    def eval_loss_of(data: Dataset, max_len: int | None) -> float:
        # FSDP2 gathers weights in the module's own hooks; DDP adds nothing to a no-grad forward.
        return eval_loss(steps.backend, steps.model, data, run.cfg.batch_size, run.pad, steps.precision, max_len,
                         run.cfg.batch_tokens)

    if group.size == 1:  # packed as the training is; across ranks unpacked, so every rank runs as many batches
        return eval_loss_of(run.eval_set, run.cfg.max_seq_len if run.plan.mode == "packed" else None)
    examples = run.eval_set.examples
    mine = examples[group.rank::group.size]
    filler = Example(examples[0].input_ids, [IGNORE] * len(examples[0].input_ids))
    mine = mine + [filler] * (-(-len(examples) // group.size) - len(mine))
    tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in mine)
    with group.guard("eval", timed=False):  # a long eval is no lost rank (a sharded one gathers inside)
        mean = eval_loss_of(Dataset(mine, 0, run.eval_set.path), None)  # 0 when it holds only filler
    with group.guard("eval"):
        total, count = group.all_sum([mean * tokens, tokens])
    return float(total / max(count, 1))
