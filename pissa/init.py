"""`pissa init`: model on disk -> residual model folder OUT/ + initial adapter OUT/pissa_init/.

The layout is the official PiSSA scripts'. Tensors stream through one at a time: a target is
decomposed and its residual written before the next is read, so peak memory follows the largest
matrix, not the model. For an adapter kind that leaves the base weights alone (MoRA), OUT/ holds
the model's own weights, stored in the spec's dtype (so a GGUF or quantised input becomes a folder
transformers and mlx-lm load), and OUT/pissa_init/ the adapter at its starting point.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pissa.errors import PissaError
from pissa.formats import hf
from pissa.formats.peft import Adapter, save_adapter
from pissa.formats import quantized as qformat
from pissa.formats.safetensors import np_dtype
from pissa.layouts import base_model_info
from pissa.loaders import open_model
from pissa.ops import get_ops
from pissa.qpissa import check_backend, decompose_quantized, summarize, table
from pissa.quant import QuantScheme, check_fits
from pissa.spec import AdapterSpec

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
    kl_line: str | None = None      # QPiSSA: the step-0 KL against QLoRA (pissa.stepzero)

    def line(self) -> str:
        return (f"pissa init: {self.verb} {self.matrices} matrices, {self.trainable:,} trainable parameters, "
                f"{self.seconds:.1f} s, peak memory {self.peak_mib:,.0f} MiB -> {self.out}")


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def run_init(model: str, out: str | Path, spec: AdapterSpec, *, backend: str = "numpy",
             device: str | None = None, force: bool = False, progress: bool = True,
             max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES, svd_batch: int | None = None,
             quantize: QuantScheme | None = None, quant_iters: int = 1, step0_kl: bool = False) -> InitSummary:
    """Decompose every target of `model` and write OUT/ (residual) and OUT/pissa_init/ (adapter).

    Args:
        model: a model folder, a .gguf file, or an embedded name such as "smollm2-135m".
        out: the output folder; it must be empty or absent unless force.
        spec: the adapter to build.
        backend: "numpy", "torch" or "mlx": who does the arithmetic.
        device: the backend's device ("cpu", "cuda", ...); None picks its default.
        svd_batch: decompose up to this many same-shape targets in one batched call; None
            takes the backend's measured default (1 wherever batching was not faster).
        quantize: QPiSSA: quantise every target's residual with this scheme (pissa.quant), refined
            over quant_iters iterations (pissa.qpissa); the residual model is then written in the
            scheme's quantised layout (pissa.formats.quantized) with OUT/quant_report.json.
        step0_kl: QPiSSA only: also measure the step-0 KL per token from the original model,
            against QLoRA's (pissa.stepzero), on the torch or MLX backend; it goes into the report.

    Raises:
        PissaError: for bad input (model, spec against the model, output folder); nothing is
            written in that case.
    """
    start = time.perf_counter()
    out = Path(out)
    hf.check_out_dir(out, force)
    source = open_model(model)
    shapes = source.shapes()
    targets = set(spec.resolve(shapes))
    ops = get_ops(backend, device)
    dtype = np_dtype(spec.dtype)
    if spec.kind == "full" and source.layout.conv1d:  # its trained "adapter" is the stored [in, out] weight
        raise PissaError(f"--init full does not support {source.layout.model_type}'s Conv1D layers yet; use "
                         "--init pissa, pissa-fast, lora or mora")
    if quantize is not None:
        if quant_iters < 1:
            raise PissaError(f"--quant-iters {quant_iters} is not allowed; give 1 or more (5 is the paper's)")
        check_backend(ops, quantize)
        if source.layout.conv1d:  # neither bitsandbytes' nor MLX's layout has a transposed weight
            raise PissaError(f"--quantize does not support {source.layout.model_type}'s Conv1D layers (weights "
                             "stored [in, out]); run pissa init without --quantize")
        if spec.init not in ("pissa", "pissa-fast"):
            raise PissaError(f"--quantize needs --init pissa or pissa-fast, not {spec.init}")
        for module in sorted(targets):
            check_fits(quantize, module, shapes[f"{module}.weight"])

    kind = spec.kind_module
    steps = schedule(shapes, targets, 1 if quantize else svd_batch or ops.svd_batch)
    plan = []
    for step in steps:
        for name in step:
            if quantize is not None and name[: -len(".weight")] in targets:
                plan += qformat.plan(name[: -len(".weight")], shapes[name], quantize, spec.dtype)
            else:
                plan.append((name, dtype, shapes[name]))
    factors: dict[str, tuple[np.ndarray, ...]] = {}
    digests: dict[str, tuple[np.ndarray, ...]] = {}
    entries: dict[str, dict] = {}
    bar = tqdm(total=len(targets), desc=f"pissa init ({backend}, {spec.init})", unit="matrix",
               disable=not progress, file=sys.stderr)
    with hf.atomic_dir(out, force) as tmp:
        writer = hf.ModelWriter(tmp, plan, max_shard_bytes, layout=source.layout.for_writing())
        for step in steps:
            arrays = [source.get(name) for name in step]
            if not np.issubdtype(arrays[0].dtype, np.floating):
                raise PissaError(f"{step[0]} has dtype {arrays[0].dtype}; "
                                 "pissa handles models whose tensors are all floating point")
            modules = [name[: -len(".weight")] for name in step]
            if modules[0] in targets and quantize is not None:
                qf = decompose_quantized(arrays[0], modules[0], spec, ops, quantize, quant_iters)
                factors[modules[0]] = (qf.A, qf.B)
                entries[modules[0]] = qf.entry()
                for tname, tensor in qformat.pack(modules[0], qf.quantized):
                    writer.write(tname, tensor)
                bar.set_postfix_str(f"reduction {100 * entries[modules[0]]['reduction']:.1f}%")
                bar.update(1)
            elif modules[0] in targets:
                for name, module, result in zip(step, modules, kind.init(arrays, modules, spec, ops)):
                    factors[module] = result.params
                    if kind.EMPTY_INIT:  # no parameters to fingerprint: the weights themselves are the start
                        digests[module] = (np.frombuffer(hashlib.sha256(result.base.tobytes()).digest(), np.uint8),)
                    writer.write(name, result.base)
                bar.update(len(step))
            else:
                writer.write(step[0], np.asarray(arrays[0]).astype(dtype))
            del arrays
        writer.close()
        bar.close()
        config = hf.model_config(source.config, spec.dtype)
        report = None
        if quantize is not None:
            linear = [n[: -len(".weight")] for n, shp in shapes.items()
                      if n.endswith(".weight") and len(shp) == 2 and "embed" not in n]
            config.update(qformat.config_entries(quantize, sorted(targets),
                                                 [m for m in linear if m not in targets]))
            report = {"scheme": quantize.name, "group_size": quantize.group_size, "bits": quantize.bits,
                      "rank": spec.rank, "init": spec.init, "quant_iters": quant_iters,
                      "compute_dtype": spec.compute_dtype, "metric": "nuclear norm",
                      "by_module_type": summarize(entries), "matrices": entries}
            hf.write_json(tmp / QUANT_REPORT, report)
        hf.write_json(tmp / "config.json", config)
        if source.generation_config:
            hf.write_json(tmp / "generation_config.json", source.generation_config)
        source.save_tokenizer(tmp)
        (tmp / ADAPTER_DIR).mkdir()
        info = {"role": "pissa_init", "fingerprint": fingerprint(digests if kind.EMPTY_INIT else factors),
                "source": model}
        if kind.RECORDS_SHAPES:  # the parameters alone do not give the weight's [out, in]
            info["shapes"] = {m: list(shapes[m + ".weight"]) for m in sorted(factors)}
        info.update(base_model_info(source.layout, sorted(factors)))
        if quantize is not None:
            info["quantization"] = {"scheme": quantize.name, "group_size": quantize.group_size,
                                    "quant_iters": quant_iters}
        adapter = Adapter(spec, factors, base_model=str(out.absolute()), info=info)
        save_adapter(tmp / ADAPTER_DIR, adapter)
        kl_line = None
        if report is not None and step0_kl:
            kl_line = _step0_kl(model, tmp, targets, quantize, spec, backend, report)
    trainable = (sum(int(np.prod(shapes[m + ".weight"])) for m in factors) if kind.EMPTY_INIT
                 else sum(p.size for params in factors.values() for p in params))
    return InitSummary(len(factors), trainable, time.perf_counter() - start, peak_rss_mib(), out,
                       quant_table=table(report) if report else None,
                       verb="decomposed" if kind.RESIDUAL else "started " + (
                           f"mora ({spec.mora_type})" if spec.kind == "mora" else spec.kind) + " on",
                       kl_line=kl_line if quantize is not None and step0_kl else None)


def _step0_kl(model: str, folder: Path, targets: set[str], quantize: QuantScheme, spec: AdapterSpec,
              backend: str, report: dict) -> str:
    """Measure the step-0 KL of the finished folder (before its rename), add it to the report."""
    from pissa import stepzero

    runner = stepzero.kl_backend(backend)
    if runner is None:
        return "step-0 KL not measured: it needs the torch or MLX backend (pip install 'pissa[torch]')"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return "step-0 KL not measured: the model has no tokenizer to read the general text with"
    report["step0_kl"] = stepzero.step0_kl(model, folder, targets, quantize, spec.dtype, runner)
    hf.write_json(folder / QUANT_REPORT, report)
    return stepzero.line(report["step0_kl"])


def schedule(shapes: dict[str, tuple[int, ...]], targets: set[str], batch: int) -> list[list[str]]:
    """The order tensors are processed and written in: file order, except that a target pulls the
    next targets of its shape (up to `batch` in all) into its step, so they decompose together.
    Memory then stays at `batch` matrices."""
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
                if other not in taken and other[: -len(".weight")] in targets and shapes[other] == shapes[name]:
                    step.append(other)
        taken.update(step)
        steps.append(step)
    return steps


def fingerprint(factors: dict[str, tuple[np.ndarray, ...]]) -> str:
    """A short hash of an initial adapter, stored with it, so that conversion can tell whether
    a trained adapter started from this init."""
    h = hashlib.sha256()
    for module in sorted(factors):
        for x in factors[module]:
            h.update(module.encode())
            h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]
