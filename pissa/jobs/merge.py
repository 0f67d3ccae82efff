"""`pissa merge`: a model folder plus an adapter -> one full model folder, W + dW.

Works for a residual model with its (trained) PiSSA adapter (dW = s*B@A), for an original model
with a converted LoRA, for a model with a MoRA adapter (dW from pissa.adapters.kinds.mora), and for full
fine-tuning's trained weights (they replace the model's): each kind's merged().
Backend-neutral, streamed tensor by tensor like pissa init.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from pissa.errors import PissaError
from pissa.files.formats import hf
from pissa.adapters.adapter import Adapter, misfits
from pissa.files.formats.peft import load_adapter
from pissa.numeric.dtypes import np_dtype
from pissa.files.loaders import open_model


def run_merge(model: str, adapter_dir: str | Path | Adapter, out: str | Path, *, force: bool = False,
              dtype: str | None = None, progress: bool = True) -> int:
    """Write OUT = MODEL with the adapter (a folder, or one in memory) merged into its weights.
    Returns the modules merged.

    Raises:
        PissaError: bad paths, or an adapter whose modules or shapes do not fit the model
            (every mismatch listed).
    """
    out = Path(out)
    hf.check_out_dir(out, force)
    source = open_model(model)
    adapter = adapter_dir if isinstance(adapter_dir, Adapter) else load_adapter(adapter_dir)
    shapes = source.shapes()
    problems = [f"{m}: not in the model" for m in adapter.factors if m + ".weight" not in shapes]
    problems += misfits(adapter, {m: shapes[m + ".weight"] for m in adapter.factors if m + ".weight" in shapes})
    if problems:
        raise PissaError(f"the adapter does not fit {model} ({len(problems)} problem(s)): " + "; ".join(problems))
    store = dtype or source.config.get("dtype") or source.config.get("torch_dtype") or "float32"
    if store not in ("float32", "bfloat16", "float16"):
        store = "float32"
    dt = np_dtype(store)
    with hf.atomic_dir(out, force) as tmp:
        writer = hf.ModelWriter(tmp, [(n, dt, s) for n, s in shapes.items()], layout=source.layout.for_writing())
        for name in tqdm(shapes, desc="pissa merge", unit="tensor", disable=not progress):
            W = source.get(name)
            module = name[: -len(".weight")]
            if module in adapter.factors:
                W = adapter.spec.kind_module.merged(adapter.spec, adapter.factors[module], W)
            writer.write(name, W.astype(dt))
        writer.close()
        hf.write_json(tmp / "config.json", hf.model_config(source.config, store))
        if source.generation_config:
            hf.write_json(tmp / "generation_config.json", source.generation_config)
        source.save_tokenizer(tmp)
    return len(adapter.factors)
