"""`pissa compare`: how much each method learns against how much it forgets ("LoRA Learns Less
and Forgets Less", arXiv 2405.09673), over a grid of methods x learning rates x ranks, on either
backend.

Every run is an ordinary `pissa init` + `pissa train` (the training in a child process, so that
its peak memory is its own and Ctrl-C stops it cleanly with a checkpoint); then each checkpoint
in --eval-at is measured in this process (pissa.studies.evaluate.Session, on the backend):
- learning: exact match and loss on the held-out target examples;
- forgetting: loss and KL from the base model on general text, and the knowledge probe
  (pissa.studies.forgetting).
OUT/runs/NAME/ holds each run (its checkpoints, rows, and the probe's scored options); a run with
done.json is reused when the command runs again, so a crash or Ctrl-C loses at most one run.
OUT/results.jsonl, pareto.png, lr.png and report.md are rewritten after every run
(pissa.studies.report).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pissa.adapters import kinds
from pissa.adapters.spec import DEFAULT_RANK, AdapterSpec
from pissa.errors import PissaError
from pissa.jobs.init import run_init
from pissa.numeric.backend import get_backend
from pissa.numeric.quant import scheme
from pissa.studies import forgetting
from pissa.studies.evaluate import Session
from pissa.studies.scoring import exact_match
from pissa.studies.spectrum import weight_change_ranks
from pissa.training.loop import DIVERGED
from pissa.training.run import CHECKPOINTS

SPECTRUM = "spectrum.json"  # runs/NAME/spectrum.json: the rank of its weight change per module type

# A method is an init (a LoRA-shaped adapter that starts so: "pissa", "olora", ...), a kind ("dora",
# "mora", "full"; a LoRA-shaped kind alone starts as LoRA does, as its paper trains it), a kind
# and an init ("dora+pissa"), or "qpissa" (PiSSA on the backend's quantised residual).
QPISSA = "qpissa"


def method_spec(method: str) -> tuple[str, str | None]:
    """(kind, init) of a --methods entry.

    Raises:
        PissaError: for a name that is neither a kind, an init, KIND+INIT nor qpissa.
    """
    from pissa.adapters import inits

    if method == QPISSA:
        return "lora", "pissa"
    kind, _, init = method.partition("+")
    if init:
        if kind not in kinds.names() or init not in inits.names() or not kinds.get(kind).LORA_SHAPED:
            raise PissaError(f"unknown method {method!r}: KIND+INIT takes a LoRA-shaped kind and an init")
        return kind, init
    if method in inits.names():
        return "lora", method
    if method in kinds.names():
        return method, ("lora" if kinds.get(method).LORA_SHAPED else None)
    raise PissaError(f"unknown method {method!r}; choose an init ({', '.join(inits.names())}), a kind "
                     f"({', '.join(kinds.names())}), KIND+INIT (e.g. dora+pissa) or qpissa")
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M on the arithmetic demo task: PiSSA against LoRA at the paper's lr (2e-5), and
    # full fine-tuning against the adapters across learning rates. About an hour on 2 CPU cores
    # (torch); docs/compare-smollm2/ holds its report.
    "smollm2": dict(model="smollm2-135m", data="data/arith/train.jsonl", eval_data="data/arith/eval.jsonl",
                    methods=("full", "lora", "pissa", "mora"), lrs=(2e-5, 1e-4, 5e-4), ranks=(16,), steps=60,
                    eval_at=(20, 60), batch_size=4, max_seq_len=128, eval_limit=32, general_tokens=2048,
                    probe_limit=120),
}


@dataclass(frozen=True)
class Grid:
    """What `pissa compare` runs and measures. eval_at: the steps measured (step 0, the
    untrained init, always is); full fine-tuning ignores ranks."""

    methods: tuple[str, ...] = ("full", "lora", "pissa", "mora")
    lrs: tuple[float, ...] = (2e-5, 2e-4)
    ranks: tuple[int, ...] = (16,)
    steps: int = 100
    eval_at: tuple[int, ...] = ()
    batch_size: int = 4
    max_seq_len: int = 256
    eval_limit: int = 32
    general_tokens: int = 2048
    probe_limit: int = 0              # 0: every probe question
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.methods:
            raise PissaError("--methods is empty; give e.g. full,lora,pissa,mora")
        for method in self.methods:
            method_spec(method)
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise PissaError(f"--lrs must be positive numbers, got {list(self.lrs)}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise PissaError(f"--ranks must be positive integers, got {list(self.ranks)}")
        at = self.eval_at or (max(1, self.steps // 2), self.steps)
        if any(s < 1 or s > self.steps for s in at):
            raise PissaError(f"--eval-at steps must lie in 1..--steps ({self.steps}), got {list(at)}")
        object.__setattr__(self, "eval_at", tuple(sorted(set(at))))


@dataclass(frozen=True)
class RunPlan:
    method: str
    rank: int | None
    lr: float

    @property
    def init_name(self) -> str:
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"

    @property
    def name(self) -> str:
        return f"{self.init_name}-lr{self.lr:g}"


def plan(grid: Grid) -> list[RunPlan]:
    runs = []
    for method in grid.methods:
        for rank in grid.ranks if kinds.get(method_spec(method)[0]).RANKED else (None,):
            runs += [RunPlan(method, rank, lr) for lr in grid.lrs]
    return runs


@dataclass
class EvalData:
    """The measurement sets, tokenised once with the model's tokenizer."""

    pairs: list[tuple[str, str]]
    target: list
    general: list
    probe: list[dict]
    probe_examples: list
    pad: int
    batch_size: int = 8

    @classmethod
    def build(cls, tokenizer, eval_data: Path, grid: Grid) -> "EvalData":
        from pissa.training.data import eval_split
        from pissa.files.tokenizer import pad_id

        pairs, dataset = eval_split(eval_data, tokenizer, grid.max_seq_len, grid.eval_limit)
        probe = forgetting.probe_items()
        probe = probe[: grid.probe_limit] if grid.probe_limit else probe
        return cls(pairs, dataset.examples, forgetting.general_examples(tokenizer, grid.general_tokens), probe,
                   forgetting.probe_examples(tokenizer, probe), pad_id(tokenizer), grid.batch_size)


def measure(scorer, reference, data: EvalData, max_new_tokens: int) -> tuple[dict[str, float], list[list[float]]]:
    """Every metric of one model: (metrics, the probe's option scores)."""
    target = forgetting.GeneralScore()
    for batch in forgetting.batches(data.target, data.batch_size, data.pad):
        nll, _, n = scorer.token_stats(batch)
        target.add(nll, np.zeros_like(nll), n)
    answers = []
    for i in range(0, len(data.pairs), data.batch_size):
        answers += scorer.generate([c for c, _ in data.pairs[i:i + data.batch_size]], max_new_tokens)
    general = forgetting.GeneralScore()
    for batch in forgetting.batches(data.general, data.batch_size, data.pad):
        general.add(*scorer.token_stats(batch, reference))
    sums, counts = [], []
    for batch in forgetting.batches(data.probe_examples, 4 * data.batch_size, data.pad):
        nll, _, n = scorer.token_stats(batch)
        sums += list(-nll)
        counts += list(n)
    scores = forgetting.option_scores(data.probe, np.array(sums), np.array(counts))
    metrics = {"target_exact_match": float(np.mean([exact_match(a, ref) for a, (_, ref) in zip(answers, data.pairs)])),
               "target_loss": target.metrics()["general_loss"], **general.metrics(),
               "probe_accuracy": forgetting.probe_accuracy(data.probe, scores)}
    return metrics, scores


@dataclass
class Compare:
    """One `pissa compare` invocation: the grid, where it writes, and the backend it runs on."""

    model: str
    data: Path
    eval_data: Path
    out: Path
    grid: Grid
    backend: str
    progress: bool = True
    keep_checkpoints: bool = False
    _step0: dict = field(default_factory=dict)

    def init_dir(self, run: RunPlan) -> Path:
        """OUT/inits/NAME: `pissa init` for the run's method and rank, made once and shared by its lrs."""
        folder = self.out / "inits" / run.init_name
        if (folder / "pissa_init").is_dir():
            return folder
        kind, init = method_spec(run.method)
        spec = AdapterSpec(rank=run.rank or DEFAULT_RANK, kind=kind, init=init, seed=self.grid.seed,
                           compute_dtype="float32")
        quantize = scheme(get_backend(self.backend).qpissa_scheme, 64) if run.method == QPISSA else None
        run_init(self.model, folder, spec, backend="numpy", force=True, progress=False, quantize=quantize)
        return folder

    def train(self, run: RunPlan, init: Path, folder: Path) -> dict[str, Any]:
        """`pissa train` in a child process. Returns its peak RSS, seconds and tokens/s, or
        {"diverged": step} when its loss became NaN."""
        # Checkpoints at the measured steps only, every one kept until measured (then deleted).
        cmd = [sys.executable, "-m", "pissa.cli", "train", str(init), "--data", str(self.data), "--out", str(folder),
               "--steps", str(self.grid.steps), "--lr", repr(run.lr), "--batch-size", str(self.grid.batch_size),
               "--max-seq-len", str(self.grid.max_seq_len), "--save-at", ",".join(map(str, self.grid.eval_at)),
               "--keep-checkpoints", "0", "--seed", str(self.grid.seed), "--backend", self.backend, "--no-progress",
               "--force"]
        log = folder.parent / f"{run.name}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            try:
                _, status, usage = os.wait4(child.pid, 0)
            except KeyboardInterrupt:
                child.wait()
                raise
        code = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        diverged = folder / DIVERGED
        if code == 2 and diverged.is_file():
            return {"diverged": json.loads(diverged.read_text())["message"]}
        if code != 0:
            raise PissaError(f"training {run.name} failed (exit {code}); its output is in {log}")
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        peak = usage.ru_maxrss / (1024**2 if sys.platform == "darwin" else 1024)
        return {"peak_mib": round(peak, 1), "train_seconds": round(seconds, 1),
                "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None}

    def checkpoint(self, run: RunPlan, step: int) -> Path:
        """The adapter of a run's checkpoint at `step`."""
        return self.out / "runs" / run.name / "checkpoints" / f"step-{step:06d}" / "adapter"

    def run_one(self, run: RunPlan, reference, data: EvalData) -> list[dict[str, Any]]:
        folder = self.out / "runs" / run.name
        if (folder / "done.json").is_file():
            return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line]
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        init = self.init_dir(run)
        base = {"method": run.method, "rank": run.rank, "lr": run.lr, "backend": self.backend}
        if run.init_name not in self._step0:
            self._step0[run.init_name] = measure(Session(self.backend, init), reference, data,
                                                 self.grid.max_new_tokens)
        metrics, scores = self._step0[run.init_name]
        stats = self.train(run, init, folder)
        rows = [{**base, "step": 0, **metrics}]
        probes = {"0": scores}
        for step in self.grid.eval_at:
            adapter = self.checkpoint(run, step)
            if "diverged" in stats or not adapter.is_dir():
                rows.append({**base, "step": step, "diverged": stats.get("diverged", "no checkpoint")})
                continue
            metrics, scores = measure(Session(self.backend, init, adapter), reference, data, self.grid.max_new_tokens)
            rows.append({**base, "step": step, **metrics, **stats})
            probes[str(step)] = scores
        (folder / "probe_scores.json").write_text(json.dumps({"items": data.probe, "scores": probes}) + "\n")
        if "diverged" not in stats:  # the weight change's spectrum at the end, while the checkpoint is here
            ranks = weight_change_ranks(self.out / "inits" / "full", init, self.checkpoint(run, self.grid.steps))
            (folder / SPECTRUM).write_text(json.dumps(ranks) + "\n")
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if not self.keep_checkpoints:  # measured: a sweep of full fine-tunes would fill a disk otherwise
            shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
        (folder / "done.json").write_text(json.dumps({"time": time.time()}) + "\n")
        return rows


def run_compare(model: str, data: str | Path, eval_data: str | Path, out: str | Path, grid: Grid, *,
                backend: str = "torch", force: bool = False, progress: bool = True,
                keep_checkpoints: bool = False) -> Path:
    """Run (or continue) the grid and write OUT/results.jsonl, pareto.png, lr.png and report.md.
    Each run's checkpoints are deleted once measured unless keep_checkpoints.

    Raises:
        PissaError: bad options or data, an OUT that holds another grid (without force), or a
            training run that failed for a reason other than a NaN loss.
    """
    from pissa.studies import report as compare_report
    from pissa.training.data import read_jsonl

    out, data, eval_data = Path(out), Path(data), Path(eval_data)
    read_jsonl(data), read_jsonl(eval_data)  # bad data is one error line before anything runs
    settings = {"model": model, "data": str(data), "eval_data": str(eval_data), "backend": backend,
                "grid": asdict(grid)}
    saved = out / "compare.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(settings)) and not force:
        raise PissaError(f"{out} holds a compare run with other settings; pass --force to start over, "
                         "or run the same command to continue it")
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=2) + "\n")

    job = Compare(model, data, eval_data, out, grid, backend, progress, keep_checkpoints)
    base_dir = job.init_dir(RunPlan("full", None, 0.0))   # the model itself: the reference for the KL
    reference = Session(backend, base_dir)
    eval_set = EvalData.build(reference.tokenizer, eval_data, grid)
    runs = plan(grid)
    rows: list[dict] = []
    with tqdm(total=len(runs), desc=f"pissa compare ({backend})", unit="run", disable=not progress,
              file=sys.stderr) as bar:
        for run in runs:
            bar.set_postfix_str(run.name)
            rows += job.run_one(run, reference, eval_set)
            compare_report.write(out, rows, grid, settings)
            bar.update(1)
    spectra = {}
    for method, r in compare_report.best(rows, grid.steps).items():
        run = next(p for p in runs if (p.method, p.rank, p.lr) == (r["method"], r["rank"], r["lr"]))
        spectrum = out / "runs" / run.name / SPECTRUM
        if spectrum.is_file():
            spectra[method] = {"run": run.name, "ranks": json.loads(spectrum.read_text())}
    compare_report.write(out, rows, grid, settings, spectra=spectra)
    return out / "report.md"
