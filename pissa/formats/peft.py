"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (+ our pissa_config.json).

PEFT keys are "base_model.model.<module>.lora_A.weight" [r, in] and "...lora_B.weight" [out, r],
the same orientation as pissa's A and B, so nothing is transposed here.
pissa_config.json holds what PEFT's config has no key for (how the adapter was initialised);
PEFT, vLLM and the llama.cpp converter ignore it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pissa.errors import PissaError
from pissa.formats import safetensors
from pissa.spec import AdapterSpec, dumps

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SIDECAR = "pissa_config.json"
_PREFIX = "base_model.model."
# mlx-lm's adapter config shares PEFT's file name; `pissa convert --format mlx-lm` writes one
# config with both sets of fields (see pissa.formats.mlx_lm). These are mlx-lm's, skipped here.
MLX_LM_KEYS = ("fine_tune_type", "num_layers", "lora_parameters")


@dataclass
class Adapter:
    """An adapter in memory: module path -> (A [r, in], B [out, r]) numpy arrays.

    info holds pissa_config.json's extra fields (e.g. "role": "pissa_init" | "trained" |
    "lora", and "fingerprint" of the initial adapter).
    """

    spec: AdapterSpec
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    base_model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def key(module: str, which: str) -> str:
    """PEFT's tensor name for a module's "A" or "B" factor."""
    return f"{_PREFIX}{module}.lora_{which}.weight"


def save_adapter(path: str | Path, adapter: Adapter) -> None:
    """Write a PEFT adapter folder into `path` (which must exist; callers write atomically)."""
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    for module, (A, B) in adapter.factors.items():
        tensors[key(module, "A")] = A
        tensors[key(module, "B")] = B
    safetensors.save(path / WEIGHTS, tensors, metadata={"format": "pt"})
    cfg = adapter.spec.to_peft_config(initialized=True, base_model=adapter.base_model)
    (path / CONFIG).write_text(dumps(cfg))
    (path / SIDECAR).write_text(dumps({"spec": adapter.spec.to_dict(), **adapter.info}))


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder (ours or PEFT's).

    Raises:
        PissaError: when the folder lacks the files, the config is not a LoRA config pissa
            supports, or a module has only one of its two factors or factors whose ranks differ.
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
    if (peft_view.rank, peft_view.alpha, peft_view.use_rslora) != (spec.rank, spec.alpha, spec.use_rslora):
        raise PissaError(f"{path}: {CONFIG} and {SIDECAR} disagree on rank/alpha; one was edited by hand")
    f = safetensors.SafetensorsFile(path / WEIGHTS)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for name in f.keys():
        if not (name.startswith(_PREFIX) and name.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise PissaError(f"{path}: unexpected tensor {name}; pissa reads LoRA A/B weights only")
        module, which = name[len(_PREFIX): -len(".lora_A.weight")], name[-8]
        factors.setdefault(module, {})[which] = np.array(f.get(name))
    problems = [f"{m}: missing lora_{w}" for m, d in factors.items() for w in "AB" if w not in d]
    problems += [f"{m}: A {d['A'].shape} and B {d['B'].shape} do not fit rank {spec.rank}"
                 for m, d in factors.items() if len(d) == 2
                 and not (d["A"].shape[0] == d["B"].shape[1] == spec.rank)]
    if problems:
        raise PissaError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return Adapter(spec, {m: (d["A"], d["B"]) for m, d in factors.items()},
                   base_model=cfg.get("base_model_name_or_path"), info=extra)


def check_fits(adapter: Adapter, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Check an adapter against a model's target weights (module path -> [out, in] shape).

    Raises:
        PissaError: once, listing every module the model lacks, every target without weights and
            every shape mismatch.
    """
    problems = [f"{m}: not a target linear layer of this model" for m in adapter.factors if m not in shapes]
    problems += [f"{m}: no adapter weights" for m in shapes if m not in adapter.factors]
    for m, (A, B) in adapter.factors.items():
        if m in shapes and (A.shape[1] != shapes[m][1] or B.shape[0] != shapes[m][0]):
            problems.append(f"{m}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit weight {tuple(shapes[m])}")
    if problems:
        raise PissaError(f"the adapter does not fit this model ({len(problems)} problem(s)): " + "; ".join(problems))


def _non_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in ("oversampling", "seed", "dtype", "compute_dtype")}
