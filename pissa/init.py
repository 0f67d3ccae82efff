"""`pissa init`: model on disk -> residual model folder OUT/ + initial adapter OUT/pissa_init/.

The layout is the official PiSSA scripts'. Tensors stream through one at a time: a target is
decomposed and its residual written before the next is read, so peak memory follows the largest
matrix, not the model.
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

from pissa.decompose import Factors, decompose
from pissa.errors import PissaError
from pissa.formats import hf
from pissa.formats.peft import Adapter, save_adapter
from pissa.formats.safetensors import np_dtype
from pissa.loaders import open_model
from pissa.ops import get_ops
from pissa.spec import AdapterSpec

ADAPTER_DIR = "pissa_init"


@dataclass
class InitSummary:
    matrices: int
    trainable: int
    seconds: float
    peak_mib: float
    out: Path

    def line(self) -> str:
        return (f"pissa init: decomposed {self.matrices} matrices, {self.trainable:,} trainable parameters, "
                f"{self.seconds:.1f} s, peak memory {self.peak_mib:,.0f} MiB -> {self.out}")


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def run_init(model: str, out: str | Path, spec: AdapterSpec, *, backend: str = "numpy",
             device: str | None = None, force: bool = False, progress: bool = True,
             max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES) -> InitSummary:
    """Decompose every target of `model` and write OUT/ (residual) and OUT/pissa_init/ (adapter).

    Args:
        model: a model folder, a .gguf file, or an embedded name such as "smollm2-135m".
        out: the output folder; it must be empty or absent unless force.
        spec: the adapter to build.
        backend: "numpy", "torch" or "mlx": who does the arithmetic.
        device: the backend's device ("cpu", "cuda", ...); None picks its default.

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

    plan = [(name, dtype, shape) for name, shape in shapes.items()]
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    bar = tqdm(total=len(targets), desc=f"pissa init ({backend}, {spec.init})", unit="matrix",
               disable=not progress, file=sys.stderr)
    with hf.atomic_dir(out, force) as tmp:
        writer = hf.ModelWriter(tmp, plan, max_shard_bytes)
        for name, shape in shapes.items():
            module = name[: -len(".weight")]
            W = source.get(name)
            if module in targets:
                f: Factors = decompose(W, module, spec, ops)
                factors[module] = (f.A, f.B)
                writer.write(name, f.residual)
                bar.update(1)
            else:
                if not np.issubdtype(W.dtype, np.floating):
                    raise PissaError(f"{name} has dtype {W.dtype}; pissa handles models whose tensors are all floating point")
                writer.write(name, np.asarray(W).astype(dtype))
            del W
        writer.close()
        bar.close()
        hf.write_json(tmp / "config.json", hf.model_config(source.config, spec.dtype))
        if source.generation_config:
            hf.write_json(tmp / "generation_config.json", source.generation_config)
        source.save_tokenizer(tmp)
        (tmp / ADAPTER_DIR).mkdir()
        adapter = Adapter(spec, factors, base_model=str(out.absolute()),
                          info={"role": "pissa_init", "fingerprint": fingerprint(factors), "source": model})
        save_adapter(tmp / ADAPTER_DIR, adapter)
    trainable = sum(A.size + B.size for A, B in factors.values())
    return InitSummary(len(factors), trainable, time.perf_counter() - start, peak_rss_mib(), out)


def fingerprint(factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A short hash of an initial adapter, stored with it, so that conversion can tell whether
    a trained adapter started from this init."""
    h = hashlib.sha256()
    for module in sorted(factors):
        for x in factors[module]:
            h.update(module.encode())
            h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]
