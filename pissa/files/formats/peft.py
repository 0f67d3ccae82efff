"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (+ our pissa_config.json).

PEFT keys are "base_model.model.<module>.lora_A.weight" [r, in] and "...lora_B.weight" [out, r],
the same orientation as pissa's A and B, so nothing is transposed here. Other adapter kinds use the
same folder with their own tensor names (pissa.adapters.kinds: each kind's TENSORS).
pissa_config.json holds what PEFT's config has no key for (how the adapter was initialised);
PEFT, vLLM and the llama.cpp converter ignore it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pissa.adapters.adapter import Adapter
from pissa.adapters.kinds import key_suffix
from pissa.errors import PissaError
from pissa.adapters.spec import AdapterSpec, dumps
from pissa.files.formats import safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SIDECAR = "pissa_config.json"
_PREFIX = "base_model.model."
# mlx-lm's adapter config shares PEFT's file name; an older pissa wrote one config with both sets of
# fields (pissa.files.formats.mlx_lm now keeps mlx-lm's in a folder of their own). Skipped when read.
MLX_LM_KEYS = ("fine_tune_type", "num_layers", "lora_parameters")


def tensor_key(module: str, name: str, kind=None) -> str:
    """The file's tensor name for one parameter (a kind's TENSORS entry) of a module: PEFT's
    "<name>.weight" for its nn.Linear parameters, the bare name for a kind's KEY_SUFFIX exceptions
    (DoRA's lora_magnitude_vector)."""
    return f"{_PREFIX}{module}.{name}" + (key_suffix(kind, name) if kind is not None else ".weight")


def save_adapter(path: str | Path, adapter: Adapter) -> None:
    """Write a PEFT adapter folder into `path` (which must exist; callers write atomically)."""
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    kind = adapter.spec.kind_module
    for module, params in adapter.factors.items():
        tensors.update((tensor_key(module, name, kind), p) for name, p in zip(kind.TENSORS, params))
    safetensors.save(path / WEIGHTS, tensors, metadata={"format": "pt"})
    cfg = adapter.spec.to_peft_config(initialized=True, base_model=adapter.base_model)
    # PEFT's flag for a base weight stored [in, out] (GPT-2's Conv1D); A and B keep their shapes.
    cfg["fan_in_fan_out"] = bool(adapter.info.get("fan_in_fan_out", False))
    (path / CONFIG).write_text(dumps(cfg))
    (path / SIDECAR).write_text(dumps({"spec": adapter.spec.to_dict(), **adapter.info}))


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder (ours or PEFT's).

    Raises:
        PissaError: when the folder lacks the files, the config is not a LoRA (or MoRA) config
            pissa supports, or a module lacks one of its kind's tensors or has inconsistent shapes.
    """
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise PissaError(f"{path} is not a PEFT adapter folder (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads((path / CONFIG).read_text())
        extra = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).is_file() else {}
    except json.JSONDecodeError as e:
        raise PissaError(f"{path}: invalid JSON in the adapter config ({e})") from None
    cfg = {k: v for k, v in cfg.items() if k not in MLX_LM_KEYS}
    spec_fields = extra.pop("spec", None)
    spec = AdapterSpec.from_dict(spec_fields) if spec_fields else AdapterSpec.from_peft_config(cfg)
    peft_view = AdapterSpec.from_peft_config(cfg, extras=_non_peft(spec.to_dict()))
    scaled = ("rank", "alpha", "use_rslora", "rank_pattern", "alpha_pattern")
    if any(getattr(peft_view, k) != getattr(spec, k) for k in scaled):
        raise PissaError(f"{path}: {CONFIG} and {SIDECAR} disagree on rank/alpha; one was edited by hand")
    kind = spec.kind_module
    f = safetensors.SafetensorsFile(path / WEIGHTS)
    found: dict[str, dict[str, np.ndarray]] = {}
    keys = {t + key_suffix(kind, t): t for t in kind.TENSORS}  # "lora_A.weight": "lora_A"
    for name in f.keys():
        leaf_key = next((k for k in keys if name.startswith(_PREFIX) and name.endswith("." + k)), None)
        module, leaf = (name[len(_PREFIX): -len(leaf_key) - 1], keys[leaf_key]) if leaf_key else (None, None)
        if leaf is None:
            raise PissaError(f"{path}: unexpected tensor {name}; a {kind.NAME} adapter holds "
                             f"{' and '.join(kind.TENSORS)} weights only")
        found.setdefault(module, {})[leaf] = np.array(f.get(name))
    problems = [f"{m}: missing {t}" for m, d in found.items() for t in kind.TENSORS if t not in d]
    factors = {m: tuple(d[t] for t in kind.TENSORS) for m, d in found.items() if len(d) == len(kind.TENSORS)}
    problems += [f"{m}: {why}" for m, params in factors.items()
                 if (why := kind.inconsistent(spec.for_module(m), params))]
    if problems:
        raise PissaError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    if cfg.get("fan_in_fan_out"):  # an adapter PEFT wrote for a Conv1D model (GPT-2)
        extra["fan_in_fan_out"] = True
    return Adapter(spec, factors, base_model=cfg.get("base_model_name_or_path"), info=extra)


def _non_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in ("oversampling", "seed", "dtype", "compute_dtype")}
