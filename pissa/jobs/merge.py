"""`pissa merge`: a model folder plus an adapter -> one full model, W + dW: a Hugging Face folder,
or with a `.gguf` name one GGUF file that llama.cpp, Ollama and LM Studio run
(pissa.files.formats.gguf_model).

Works for a residual model with its (trained) PiSSA adapter (dW = s*B@A), for an original model
with a converted LoRA, for a model with a MoRA adapter (dW from pissa.adapters.kinds.mora), and for full
fine-tuning's trained weights (they replace the model's): each kind's merged(). Without an adapter
the model is written as it is (a pissa init folder's residual, for the trained adapter's GGUF).
Backend-neutral, streamed tensor by tensor like pissa init.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from pissa.errors import PissaError
from pissa.files.formats import hf
from pissa.adapters.adapter import Adapter, misfits
from pissa.files.formats.peft import load_adapter
from pissa.numeric.dtypes import np_dtype
from pissa.files.loaders import open_model


def is_gguf(out: str | Path) -> bool:
    return Path(out).suffix.lower() == ".gguf"


def run_merge(model: str, adapter_dir: str | Path | Adapter | None, out: str | Path, *, force: bool = False,
              dtype: str | None = None, gguf_type: str | None = None, progress: bool = True) -> int:
    """Write OUT = MODEL with the adapter (a folder, or one in memory; None: none) merged into its
    weights: a Hugging Face folder, or a GGUF file when OUT ends in .gguf (`gguf_type` f32, f16,
    bf16 or q8_0; default f16, as llama.cpp's converter). Returns the modules merged.

    Raises:
        PissaError: bad paths, an adapter whose modules or shapes do not fit the model (every
            mismatch listed), --dtype with a GGUF or --gguf-type with a folder, or a model GGUF
            cannot hold (pissa.files.formats.gguf_model); nothing is written then.
    """
    out = Path(out)
    to_gguf = is_gguf(out)
    if to_gguf and dtype is not None:
        raise PissaError("--dtype is for a Hugging Face folder; a .gguf output takes --gguf-type f32|f16|bf16|q8_0")
    if not to_gguf and gguf_type is not None:
        raise PissaError(f"--gguf-type is for a .gguf output, and --out {out} is a folder; name the output FILE.gguf")
    if to_gguf:
        from pissa.files.formats.gguf_write import check_out_file

        check_out_file(out.absolute(), force)
    else:
        hf.check_out_dir(out, force)
    source = open_model(model)
    adapter = adapter_dir if isinstance(adapter_dir, Adapter) or adapter_dir is None else load_adapter(adapter_dir)
    shapes = source.shapes()
    factors = adapter.factors if adapter is not None else {}
    problems = [f"{m}: not in the model" for m in factors if m + ".weight" not in shapes]
    if adapter is not None:
        problems += misfits(adapter, {m: shapes[m + ".weight"] for m in factors if m + ".weight" in shapes})
    if problems:
        raise PissaError(f"the adapter does not fit {model} ({len(problems)} problem(s)): " + "; ".join(problems))

    def merged() -> Iterator[tuple[str, np.ndarray]]:
        for name in tqdm(shapes, desc="pissa merge", unit="tensor", disable=not progress):
            W = source.get(name)
            module = name[: -len(".weight")]
            if module in factors:
                W = adapter.spec.kind_module.merged(adapter.spec.for_module(module), factors[module], W)
            yield name, W

    if to_gguf:
        from pissa.files.formats.gguf_model import write_model_gguf

        write_model_gguf(out, source, merged(), gguf_type or "f16", force=force)
        return len(factors)
    store = dtype or source.config.get("dtype") or source.config.get("torch_dtype") or "float32"
    if store not in ("float32", "bfloat16", "float16"):
        store = "float32"
    dt = np_dtype(store)
    with hf.atomic_dir(out, force) as tmp:
        writer = hf.ModelWriter(tmp, [(n, dt, s) for n, s in shapes.items()], layout=source.layout.for_writing())
        for name, W in merged():
            writer.write(name, W.astype(dt))
        writer.close()
        hf.write_json(tmp / "config.json", hf.model_config(source.config, store))
        if source.generation_config:
            hf.write_json(tmp / "generation_config.json", source.generation_config)
        source.save_tokenizer(tmp)
    return len(factors)
