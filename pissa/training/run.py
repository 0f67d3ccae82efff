"""What both backends' training runs share: the options, the schedule, and the run folder
(checkpoints, metrics.jsonl, loss.png, the final adapter and its plain LoRA). The step loop itself
is pissa.training.loop; the backends (pissa_torch.train, pissa_mlx.train) hold only framework code.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pissa.jobs.convert import to_lora
from pissa.errors import PissaError
from pissa.files.formats import mlx_lm as mlx_lm_format
from pissa.files.formats import peft as peft_format
from pissa.files.formats.hf import atomic_dir, write_json
from pissa.adapters.adapter import Adapter, init_fingerprint

CHECKPOINTS = "checkpoints"
DEFAULT_STEPS = 100  # optimizer steps when neither --steps nor --epochs is given


@dataclass(frozen=True)
class TrainConfig:
    """Options of `pissa train` (steps is resolved by prepare(): --steps, else --epochs' worth of
    micro-batches, else DEFAULT_STEPS). Defaults follow the PiSSA paper (AdamW, cosine decay, 3% warmup,
    no weight decay, dropout 0) except the learning rate: 1e-4 suits a 135M model trained for
    minutes better than the paper's 2e-5 for 7B models over 3 epochs."""

    steps: int | None = None    # None: --epochs' worth, or DEFAULT_STEPS (pissa.training.loop.prepare)
    epochs: int | None = None   # whole passes over the data (--steps wins when both are given)
    packing: bool = True        # pack examples into rows of max_seq_len (pissa.training.batches)
    batch_size: int | None = 4  # rows per micro-batch; with batch_tokens a cap (None: none)
    batch_tokens: int | None = None  # cut micro-batches by real tokens instead (pissa.training.batches.cut)
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 256
    seed: int = 0
    eval_every: int = 0          # 0: only at the end (when there is eval data)
    save_every: int = 0          # 0: no periodic checkpoints
    save_at: tuple[int, ...] = ()  # checkpoints at these steps too (what pissa compare measures)
    keep_checkpoints: int = 2    # the newest N checkpoints stay; 0: every one
    precision: str = "auto"      # auto | fp32 | bf16 | fp16 (torch autocast on CUDA)
    grad_checkpointing: bool = False
    log_every: int = 1           # read and log the losses every N steps (each read waits for the device)
    compile: bool = False        # torch.compile each decoder layer (the torch backend)

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "batch_size", "batch_tokens", "grad_accum", "max_seq_len", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PissaError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "seed", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise PissaError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PissaError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise PissaError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        object.__setattr__(self, "save_at", tuple(sorted(set(self.save_at))))
        if any(s < 1 or (self.steps is not None and s > self.steps) for s in self.save_at):
            raise PissaError(f"--save-at steps must lie in 1..--steps ({self.steps}), got {list(self.save_at)}")
        if self.batch_size is None and self.batch_tokens is None:
            raise PissaError("give --batch-size (rows per micro-batch) or --batch-tokens (real tokens per micro-batch)")
        if self.batch_tokens is not None and self.batch_tokens < self.max_seq_len:
            raise PissaError(f"--batch-tokens {self.batch_tokens} is less than a row (--max-seq-len {self.max_seq_len}); "
                             "give at least --max-seq-len tokens")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise PissaError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class RunDir:
    """RUN_DIR/: adapter/, lora/, checkpoints/step-NNNNNN/, metrics.jsonl, loss.png, config.json."""

    def __init__(self, path: str | Path, *, resume: bool, force: bool):
        self.path = Path(path)
        exists = self.path.is_dir() and any(self.path.iterdir())
        if exists and not (resume or force):
            raise PissaError(f"--out {self.path} is not empty; pass --resume to continue that run "
                             "or --force to start over")
        if exists and force and not resume:
            shutil.rmtree(self.path)
        if resume and not self.checkpoints():
            raise PissaError(f"--resume: {self.path} has no checkpoint to resume from")
        (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    @classmethod
    def view(cls, path: str | Path) -> "RunDir":
        """The folder as ranks other than 0 see it under a launcher: they read checkpoints and
        never write (no checks, no mkdir, no --force removal racing rank 0's)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        return self

    def checkpoints(self) -> list[Path]:
        folder = self.path / CHECKPOINTS
        return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop metrics logged after the checkpoint, so the file tells one story."""
        if self.metrics_path.exists():
            keep = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= step]
            self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def saves(self, step: int, cfg: TrainConfig) -> bool:
        """Whether a run keeps a checkpoint of `step`: every --save-every steps, and at --save-at."""
        return bool(cfg.save_every and step % cfg.save_every == 0) or step in cfg.save_at

    def prune(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` complete checkpoints (0 keeps every one), oldest first;
        called once a newer one is completely written. Returns what was deleted."""
        old = self.checkpoints()[:-keep] if keep else []
        for folder in old:
            shutil.rmtree(folder)
        return old

    def save_checkpoint(self, step: int, adapter: Adapter, write_state: Any, extra: dict[str, Any]) -> Path:
        """Write checkpoints/step-NNNNNN atomically: the adapter (its float32 master weights, so
        that a resumed run continues exactly, whatever the storage dtype), the backend's optimizer,
        scaler and random state (write_state(folder) writes them), and state.json last, which marks
        it complete."""
        final = self.path / CHECKPOINTS / f"step-{step:06d}"
        with atomic_dir(final, force=True) as tmp:
            (tmp / "adapter").mkdir()
            peft_format.save_adapter(tmp / "adapter", adapter)
            write_state(tmp)
            write_json(tmp / "state.json", {"step": step, "time": time.time(), **extra})
        return final

    def plot(self) -> Path | None:
        """loss.png from metrics.jsonl (train loss and eval loss against the step). Skipped, with a
        note, when matplotlib is not installed (it comes with the test extra, not the backends)."""
        try:
            import matplotlib
        except ImportError:
            print("pissa train: loss.png skipped (matplotlib is not installed: pip install matplotlib); "
                  "the losses are in metrics.jsonl", file=sys.stderr)
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*train), label="train loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (completion tokens)")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.path / "loss.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out

    def finish(self, trained: Adapter, initial: Adapter, model_dir: Path) -> None:
        """RUN_DIR/adapter (the trained adapter) and, when its kind has an exact LoRA form,
        RUN_DIR/lora (that LoRA on the original model: rank 2r for PiSSA, r_hat for sharing MoRA),
        each written atomically. A kind without one that mlx-lm runs as it is (DoRA) gets mlx-lm's
        files in RUN_DIR/adapter/mlx_lm too, for the init folder. Full fine-tuning writes RUN_DIR/model
        instead: the init folder's model with the trained weights, an ordinary model folder."""
        if trained.spec.kind_module.OUTPUT == "model":
            from pissa.jobs.merge import run_merge

            run_merge(str(model_dir), trained, self.path / "model", force=True, progress=False)
            return
        converts = trained.spec.kind_module.converts(trained.spec)
        with atomic_dir(self.path / "adapter", force=True) as tmp:
            peft_format.save_adapter(tmp, trained)
            if not converts and mlx_lm_format.form(trained.spec.kind_module) is not None:
                mlx_lm_format.save_mlx_adapter(tmp / mlx_lm_format.FOLDER, trained)
        if not converts:
            return
        lora = to_lora(initial, trained)
        with atomic_dir(self.path / "lora", force=True) as tmp:
            peft_format.save_adapter(tmp, lora)


def save_config(run: RunDir, cfg: TrainConfig, extra: dict[str, Any]) -> None:
    write_json(run.path / "config.json", {"train": asdict(cfg), **extra})


# What shapes a run: --resume continues one only with these as they were (RUN_DIR/config.json). The
# others (eval and save cadence, checkpoints kept, gradient checkpointing, the ranks, the device)
# change how it runs, not what it computes. --steps and --epochs are among them: the schedule's cosine
# is laid over the steps, so a longer run is another run (start it from RUN_DIR/adapter with --adapter).
_SHAPING_TRAIN = ("steps", "epochs", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size",
                  "batch_tokens", "grad_accum", "max_seq_len", "seed", "packing")
_SHAPING = {"precision": "--precision", "batching": "the batching (packing or its fallback)",
            "data": "--data", "data_sha256": "--data's contents", "init_fingerprint": "the init (MODEL_DIR/pissa_init)"}


def resume_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The options that shape a run and differ between a run folder's config.json (`old`) and the
    one a --resume would write (`new`), in words, or None when the resumed run is the same run.
    A key the older file lacks (written before it was recorded) is not compared."""
    diffs = []
    was = old.get("train", {})
    for name in _SHAPING_TRAIN:
        if name in was and was[name] != new["train"][name]:
            diffs.append(f"--{name.replace('_', '-')} {_word(was[name])} (now {_word(new['train'][name])})")
    for key, what in _SHAPING.items():
        if key in old and old[key] != new.get(key):
            diffs.append(f"{what} {_word(old[key])} (now {_word(new.get(key))})" if key != "data_sha256"
                         else f"{what} (the file changed)")
    before, now = old.get("spec", {}).get("dropout"), new["spec"].get("dropout")
    if before is not None and before != now:
        diffs.append(f"--dropout {_word(before)} (now {_word(now)})")
    return "; ".join(diffs) or None


def _word(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "unset"}[value]
    return str(value)


def initial_adapter(model_dir: Path, adapter_dir: str | Path | None) -> tuple[Adapter, Adapter]:
    """(start, init): the adapter training starts from (default MODEL_DIR/pissa_init) and the
    pissa_init it descends from, for conversion.

    Raises:
        PissaError: no model folder or pissa_init/, or an --adapter of another init: its recorded
            init fingerprint differs, or (an adapter without one, e.g. trained with PEFT) its
            modules or parameter shapes differ from the init's.
    """
    init_dir = Path(model_dir) / "pissa_init"
    if not (Path(model_dir) / "config.json").is_file():
        raise PissaError(f"{model_dir} is not a model folder written by pissa init (no config.json)")
    if not init_dir.is_dir():
        raise PissaError(f"{model_dir} has no pissa_init/ adapter; run pissa init first")
    init = peft_format.load_adapter(init_dir)
    init.info.setdefault("fingerprint", init_fingerprint(init))
    start = peft_format.load_adapter(adapter_dir) if adapter_dir else init
    started = start.info.get("init_fingerprint", start.info.get("fingerprint"))
    if adapter_dir and started is not None and started != init.info["fingerprint"]:
        raise PissaError(f"--adapter {adapter_dir} was not trained from {init_dir}; pass the model folder it came from")
    if adapter_dir and started is None:
        def shapes(a: Adapter) -> dict:
            return {m: [p.shape for p in params] for m, params in a.factors.items()}
        if shapes(start) != shapes(init) or start.spec.kind != init.spec.kind:
            raise PissaError(f"--adapter {adapter_dir} does not fit {init_dir} (other modules, ranks or shapes); "
                             "pass the model folder it was trained from")
    return start, init
