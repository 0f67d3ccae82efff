"""Model folders into a backend's model: a pissa init folder with its adapter (`load`), or any
model folder for inference (`load_for_inference`), over the Backend protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pissa.adapters import model as adapters_model
from pissa.adapters.adapter import Adapter
from pissa.adapters.spec import AdapterSpec
from pissa.files.formats import peft as peft_format

INIT_DIR = "pissa_init"


def quantized_residuals(model_dir: str | Path) -> set[str]:
    """The modules of a QPiSSA folder whose weights are quantised residuals Q(W_res): config.json's
    "pissa_quantization" "modules" (written by pissa init --quantize); empty for other folders."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return set((config.get("pissa_quantization") or {}).get("modules", ()))


def load(backend, model_dir: str | Path, adapter: str | Path | Adapter | None = None, *, device: Any = None,
         precision: str = "fp32") -> tuple[Any, AdapterSpec]:
    """A pissa init folder (the residual model, or the unchanged base for MoRA and full
    fine-tuning) with an adapter (a folder, an Adapter, or by default MODEL_DIR/pissa_init), no SVD.
    A QPiSSA folder loads with its quantised residuals as the backend's quantised layers.

    Returns:
        (model, spec): the backend's model with adapter layers, on `device`.

    Raises:
        PissaError: a folder the backend cannot load, or an adapter that does not fit it.
    """
    if not isinstance(adapter, Adapter):
        adapter = peft_format.load_adapter(adapter or Path(model_dir) / INIT_DIR)
    model = backend.load_base(model_dir, backend.device(device), precision)
    adapters_model.apply(backend, model, adapter.spec, adapter, quantized_residuals=quantized_residuals(model_dir))
    return model, adapter.spec


def load_for_inference(backend, model_dir: Path, adapter: str | Path | None, device: Any, precision: str) -> Any:
    """A pissa init folder (with its pissa_init, or the given adapter) or a plain model folder,
    in eval mode."""
    if adapter or (Path(model_dir) / INIT_DIR).is_dir():
        model, _ = load(backend, model_dir, adapter, device=device, precision=precision)
    else:
        model = backend.load_base(model_dir, device, precision)
    model.eval()
    return model


def save_adapter(backend, model: Any, path: str | Path, spec: AdapterSpec, info: dict | None = None) -> None:
    """Write the model's adapter as a PEFT folder at `path` (created; written atomically), which
    either backend and PEFT load."""
    from pissa.files.formats.hf import atomic_dir

    with atomic_dir(Path(path), force=True) as tmp:
        peft_format.save_adapter(tmp, adapters_model.adapter_of(backend, model, spec, info))


def verbs(backend) -> dict[str, Any]:
    """The public verbs of a backend package (`from pissa_torch import apply, load, ...`): the
    core's functions with the backend bound, keeping their names and docstrings."""
    import functools

    found = {}
    for fn in (adapters_model.apply, adapters_model.merge, adapters_model.unmerge, adapters_model.adapter_state_dict,
               adapters_model.adapter_of, load, save_adapter):
        bound = functools.partial(fn, backend)
        functools.update_wrapper(bound, fn)
        found[fn.__name__] = bound
    return found
