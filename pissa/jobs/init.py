"""`pissa init`: model on disk -> residual model folder OUT/ + initial adapter OUT/pissa_init/.

The layout is the official PiSSA scripts'. Tensors stream through one at a time: a target is
decomposed and its residual written before the next is read, so peak memory follows the largest
matrix, not the model. For an adapter kind that leaves the base weights alone (MoRA, full
fine-tuning), OUT/ holds the model's own weights, stored in the spec's dtype (so a GGUF or
quantised input becomes a folder transformers and mlx-lm load), and OUT/pissa_init/ the adapter
at its starting point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pissa.errors import PissaError
from pissa.memory import peak_rss_mib
from pissa.files.formats import hf
from pissa.adapters.adapter import Adapter, fingerprint
from pissa.files.formats.peft import save_adapter
from pissa.files.formats import quantized as qformat
from pissa.files.formats.safetensors import is_float
from pissa.numeric.dtypes import np_dtype
from pissa.files.layouts import base_model_info
from pissa.files.loaders import open_model
from pissa.numeric.ops import get_ops
from pissa.numeric.qpissa import DEFAULT_ITERS, check_backend, summarize, table
from pissa.numeric.quant import QuantScheme, check_fits
from pissa.adapters.spec import AdapterSpec

ADAPTER_DIR = "pissa_init"
QUANT_REPORT = "quant_report.json"


@dataclass
class InitSummary:
    matrices: int
    trainable: int
    seconds: float
    peak_mib: float
    out: Path
    quant_table: str | None = None
    verb: str = "decomposed"
    ranks: int = 1
    kl_line: str | None = None      # QPiSSA: the step-0 KL against QLoRA (pissa.studies.stepzero)

    def line(self) -> str:
        where = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        peak = " (the largest of any rank)" if self.ranks > 1 else ""
        return (f"pissa init: {self.verb} {self.matrices} matrices{where}, {self.trainable:,} trainable parameters, "
                f"{self.seconds:.1f} s, peak memory {self.peak_mib:,.0f} MiB{peak} -> {self.out}")


def run_init(model: str, out: str | Path, spec: AdapterSpec, *, backend: str = "numpy",
             device: str | None = None, force: bool = False, progress: bool = True,
             max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES, svd_batch: int | None = None,
             quantize: QuantScheme | None = None, quant_iters: int = DEFAULT_ITERS, measure=None,
             group=None) -> InitSummary:
    """Decompose every target of `model` and write OUT/ (residual) and OUT/pissa_init/ (adapter).

    Args:
        model: a model folder, a .gguf file, or an embedded name such as "smollm2-135m".
        out: the output folder; it must be empty or absent unless force.
        spec: the adapter to build.
        backend: "numpy", "torch" or "mlx": who does the arithmetic.
        device: the backend's device ("cpu", "cuda", ...); None picks its default.
        svd_batch: decompose up to this many same-shape targets in one batched call; None
            takes the backend's measured default (1 wherever batching was not faster).
        quantize: QPiSSA: quantise every target's residual with this scheme (pissa.numeric.quant), refined
            over quant_iters iterations (default 5, pissa.numeric.qpissa.DEFAULT_ITERS); the residual model is then written in the
            scheme's quantised layout (pissa.files.formats.quantized) with OUT/quant_report.json.
        measure: QPiSSA only: measure(job, folder) -> a line to print, called on the finished
            folder before it is renamed (the CLI passes pissa.studies.stepzero.measure_init, the
            step-0 KL against QLoRA, which it adds to the report). A study lives above this job,
            so the job takes it as an argument rather than importing it.
        group: the ranks to split the work over (pissa.dist); default: the launcher's (torchrun,
            mlx.launch), or this process alone. Across ranks the folder is byte for byte the one a
            single process writes (pissa.jobs.init_ranks).

    Raises:
        PissaError: for bad input (model, spec against the model, output folder); nothing is
            written in that case.
    """
    from pissa import dist

    start = time.perf_counter()
    group = group or dist.current()
    job = dist.agree(group, lambda: Job(model, Path(out), spec, backend, device, force, svd_batch, quantize,
                                        quant_iters, measure), what="checking the model and options")
    if group.size > 1:
        from pissa.jobs.init_ranks import run_ranks

        return run_ranks(job, group, start, progress, max_shard_bytes)
    bar = job.bar(len(job.targets), progress)
    with hf.atomic_dir(job.out, force) as tmp:
        writer = hf.ModelWriter(tmp, job.plan, max_shard_bytes, layout=job.layout)
        for step in job.steps:
            job.run(step, writer, bar)
        writer.close()
        bar.close()
        job.finish(tmp)
    return job.summary(time.perf_counter() - start, peak_rss_mib())


class Job:
    """One `pissa init`: the checked inputs, the order of work (schedule) and what each tensor
    becomes (plan), the results so far (factors, quant entries), and the files that end it. The
    single-process path runs every step; across ranks each rank runs its share (pissa.jobs.init_ranks)."""

    def __init__(self, model: str, out: Path, spec: AdapterSpec, backend: str, device: str | None, force: bool,
                 svd_batch: int | None, quantize: QuantScheme | None, quant_iters: int, measure=None):
        hf.check_out_dir(out, force)
        self.quantize, self.quant_iters, self.measure = quantize, quant_iters, measure
        self.source = source = open_model(model)
        if spec.dtype is None:  # the source's storage dtype (bfloat16 for a dequantised input)
            spec = dataclasses.replace(spec, dtype=source.storage_dtype)
        self.model, self.out, self.spec, self.backend = model, out, spec, backend
        self.layout = source.layout.for_writing()  # GPT-2's Conv1D weights are stored [in, out]
        self.shapes = shapes = self.source.shapes()
        self.targets = targets = set(spec.resolve(shapes))
        self.ops = get_ops(backend, device)
        self.dtype = np_dtype(spec.dtype)
        if spec.kind == "full" and source.layout.conv1d:  # its trained "adapter" is the stored [in, out] weight
            raise PissaError(f"--kind full does not support {source.layout.model_type}'s Conv1D layers yet; use "
                             "--kind lora, dora or mora")
        if quantize is not None:
            if quant_iters < 1:
                raise PissaError(f"--quant-iters {quant_iters} is not allowed; give 1 or more (5 is the paper's)")
            check_backend(self.ops, quantize)
            if source.layout.conv1d:  # neither bitsandbytes' nor MLX's layout has a transposed weight
                raise PissaError(f"--quantize does not support {source.layout.model_type}'s Conv1D layers (weights "
                                 "stored [in, out]); run pissa init without --quantize")
            if spec.kind != "lora":
                raise PissaError(f"--quantize needs --kind lora (QPiSSA quantises the residual of PEFT's A and B), "
                                 f"not --kind {spec.kind}")
            if not spec.init_module.QPISSA:
                raise PissaError(f"--quantize needs --kind lora and an init that takes the principal part (pissa or "
                                 f"pissa-fast), not {spec.init}")
            for module in sorted(targets):
                check_fits(quantize, module, shapes[f"{module}.weight"])
        self.kind = spec.kind_module
        self.steps = schedule(shapes, targets, 1 if quantize else svd_batch or self.ops.svd_batch,
                              lambda m: (spec.for_module(m).rank, spec.for_module(m).alpha))
        self.plan = []
        for step in self.steps:
            for name in step:
                if quantize is not None and name[: -len(".weight")] in targets:
                    self.plan += qformat.plan(name[: -len(".weight")], shapes[name], quantize, spec.dtype)
                else:
                    self.plan.append((name, self.dtype, shapes[name]))
        self.factors: dict[str, tuple[np.ndarray, ...]] = {}
        # EMPTY_INIT kinds (full fine-tuning) store no parameters; their fingerprint hashes the weights.
        self.digests: dict[str, tuple[np.ndarray, ...]] = {}
        self.entries: dict[str, dict] = {}
        self.kl_line: str | None = None
        self.report: dict | None = None
        self.ranks = 1

    def bar(self, total: int, progress: bool, note: str = ""):
        return tqdm(total=total, desc=f"pissa init ({self.backend}, {self.spec.describe()}{note})", unit="matrix",
                    disable=not progress, file=sys.stderr)

    def run(self, step: list[str], writer, bar) -> None:
        """Read, decompose (or copy) and write one step's tensors, keeping their factors.

        Only a decomposition reads its weights into memory as float32. A tensor that passes
        through (a non-target, or a target whose init leaves the base alone: LoRA's init, MoRA,
        full fine-tuning) goes from the input's memory map to the output in chunks (the writer
        casts each), so no whole copy of it exists: an init's memory follows the matrices it
        decomposes, not the largest tensor (an embedding) it copies."""
        spec, targets, quantize = self.spec, self.targets, self.quantize
        modules = [name[: -len(".weight")] for name in step]
        computes = modules[0] in targets and (quantize is not None or self.kind.changes_base(spec))
        arrays = [self.source.get(name) if computes else self.source.stored(name) for name in step]
        if not is_float(arrays[0].dtype):
            raise PissaError(f"{step[0]} has dtype {arrays[0].dtype}; "
                             "pissa handles models whose tensors are all floating point")
        spec = spec.for_module(modules[0])  # a step's targets share their rank and alpha (schedule)
        if modules[0] in targets and quantize is not None:
            qf = self.kind.init_quantized(arrays[0], modules[0], spec, self.ops, quantize, self.quant_iters)
            self.factors[modules[0]] = (qf.A, qf.B)
            self.entries[modules[0]] = qf.entry()
            for tname, tensor in qformat.pack(modules[0], qf.quantized):
                writer.write(tname, tensor)
            bar.set_postfix_str(f"reduction {100 * self.entries[modules[0]]['reduction']:.1f}%")
            bar.update(1)
        elif modules[0] in targets:
            for name, module, result in zip(step, modules, self.kind.init(arrays, modules, spec, self.ops)):
                self.factors[module] = result.params
                if self.kind.EMPTY_INIT:
                    self.digests[module] = (np.frombuffer(_sha256(result.base), np.uint8),)
                writer.write(name, result.base)
            bar.update(len(step))
        else:
            writer.write(step[0], arrays[0])  # cast to the storage dtype by the writer, chunk by chunk
        self.source.release()

    def finish(self, tmp: Path) -> None:
        """Everything but the weights: config.json, quant_report.json, generation config,
        tokenizer, and the adapter folder (from every step's factors)."""
        spec, shapes, quantize, factors = self.spec, self.shapes, self.quantize, self.factors
        config = hf.model_config(self.source.config, spec.dtype)
        if quantize is not None:
            linear = [n[: -len(".weight")] for n, shp in shapes.items()
                      if n.endswith(".weight") and len(shp) == 2 and "embed" not in n]
            config.update(qformat.config_entries(quantize, sorted(self.targets),
                                                 [m for m in linear if m not in self.targets]))
            self.report = {"scheme": quantize.name, "group_size": quantize.group_size, "bits": quantize.bits,
                           "rank": spec.rank, "init": spec.init, "quant_iters": self.quant_iters,
                           "compute_dtype": spec.compute_dtype, "metric": "nuclear norm",
                           "by_module_type": summarize(self.entries), "matrices": self.entries}
            hf.write_json(tmp / QUANT_REPORT, self.report)
        hf.write_json(tmp / "config.json", config)
        if self.source.generation_config:
            hf.write_json(tmp / "generation_config.json", self.source.generation_config)
        self.source.save_tokenizer(tmp)
        (tmp / ADAPTER_DIR).mkdir()
        info = {"role": "pissa_init", "fingerprint": fingerprint(self.digests if self.kind.EMPTY_INIT else factors),
                "source": self.model}
        if self.kind.RECORDS_SHAPES:  # the parameters alone do not give the weight's [out, in]
            info["shapes"] = {m: list(shapes[m + ".weight"]) for m in sorted(factors)}
        info.update(base_model_info(self.source.layout, sorted(factors)))
        if quantize is not None:
            info["quantization"] = {"scheme": quantize.name, "group_size": quantize.group_size,
                                    "quant_iters": self.quant_iters}
        save_adapter(tmp / ADAPTER_DIR, Adapter(spec, factors, base_model=str(self.out.absolute()), info=info))
        if self.report is not None and self.measure is not None:
            self.kl_line = self.measure(self, tmp)

    def summary(self, seconds: float, peak_mib: float) -> InitSummary:
        if self.kind.EMPTY_INIT:
            trainable = sum(int(np.prod(self.shapes[m + ".weight"])) for m in self.factors)
        else:
            trainable = sum(p.size for params in self.factors.values() for p in params)
        spec = self.spec
        verb = "decomposed" if self.kind.changes_base(spec) else f"started {spec.describe()} on"
        return InitSummary(len(self.factors), trainable, seconds, peak_mib, self.out,
                           quant_table=table(self.report) if self.report else None, verb=verb, ranks=self.ranks,
                           kl_line=self.kl_line)


def _sha256(x: np.ndarray) -> bytes:
    """The digest of x's bytes (x.tobytes()) without copying a contiguous x (a memory map)."""
    return hashlib.sha256(np.ascontiguousarray(x).view(np.uint8).reshape(-1).data).digest()


def schedule(shapes: dict[str, tuple[int, ...]], targets: set[str], batch: int, same=lambda module: None
             ) -> list[list[str]]:
    """The order tensors are processed and written in: file order, except that a target pulls the
    next targets of its shape (up to `batch` in all, and with the same `same(module)`: their rank
    and alpha) into its step, so they decompose together. Memory then stays at `batch` matrices."""
    steps: list[list[str]] = []
    taken: set[str] = set()
    names = list(shapes)
    for i, name in enumerate(names):
        if name in taken:
            continue
        step = [name]
        if name[: -len(".weight")] in targets:
            for other in names[i + 1:]:
                if len(step) >= batch:
                    break
                if (other not in taken and other[: -len(".weight")] in targets and shapes[other] == shapes[name]
                        and same(other[: -len(".weight")]) == same(name[: -len(".weight")])):
                    step.append(other)
        taken.update(step)
        steps.append(step)
    return steps
