"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (+ our pissa_config.json).

PEFT keys are "base_model.model.<module>.lora_A.weight" [r, in] and "...lora_B.weight" [out, r],
the same orientation as pissa's A and B, so nothing is transposed here. Other adapter kinds use the
same folder with their own tensor names (pissa.kinds: each kind's TENSORS).
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
    """An adapter in memory: module path -> the kind's parameters as numpy arrays, in the order of
    spec.kind_module.TENSORS: (A [r, in], B [out, r]) for PiSSA and LoRA, (M [r_hat, r_hat],) for MoRA.

    info holds pissa_config.json's extra fields (e.g. "role": "pissa_init" | "trained" |
    "lora", and "fingerprint" of the initial adapter).
    """

    spec: AdapterSpec
    factors: dict[str, tuple[np.ndarray, ...]]
    base_model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def key(module: str, which: str) -> str:
    """PEFT's tensor name for a module's "A" or "B" factor."""
    return tensor_key(module, f"lora_{which}")


def tensor_key(module: str, name: str) -> str:
    """The file's tensor name for one parameter (a kind's TENSORS entry) of a module."""
    return f"{_PREFIX}{module}.{name}.weight"


def save_adapter(path: str | Path, adapter: Adapter) -> None:
    """Write a PEFT adapter folder into `path` (which must exist; callers write atomically)."""
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    names = adapter.spec.kind_module.TENSORS
    for module, params in adapter.factors.items():
        tensors.update((tensor_key(module, name), p) for name, p in zip(names, params))
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
    if (peft_view.rank, peft_view.alpha, peft_view.use_rslora) != (spec.rank, spec.alpha, spec.use_rslora):
        raise PissaError(f"{path}: {CONFIG} and {SIDECAR} disagree on rank/alpha; one was edited by hand")
    kind = spec.kind_module
    f = safetensors.SafetensorsFile(path / WEIGHTS)
    found: dict[str, dict[str, np.ndarray]] = {}
    for name in f.keys():
        module, _, leaf = name.removeprefix(_PREFIX).removesuffix(".weight").rpartition(".")
        if not (name.startswith(_PREFIX) and name.endswith(".weight") and leaf in kind.TENSORS):
            raise PissaError(f"{path}: unexpected tensor {name}; a {kind.NAME} adapter holds "
                             f"{' and '.join(kind.TENSORS)} weights only")
        found.setdefault(module, {})[leaf] = np.array(f.get(name))
    problems = [f"{m}: missing {t}" for m, d in found.items() for t in kind.TENSORS if t not in d]
    factors = {m: tuple(d[t] for t in kind.TENSORS) for m, d in found.items() if len(d) == len(kind.TENSORS)}
    problems += [f"{m}: {why}" for m, params in factors.items() if (why := kind.inconsistent(spec, params))]
    if problems:
        raise PissaError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    if cfg.get("fan_in_fan_out"):  # an adapter PEFT wrote for a Conv1D model (GPT-2)
        extra["fan_in_fan_out"] = True
    return Adapter(spec, factors, base_model=cfg.get("base_model_name_or_path"), info=extra)


def check_fits(adapter: Adapter, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Check an adapter against a model's target weights (module path -> [out, in] shape).

    Raises:
        PissaError: once, listing every module the model lacks, every target without weights and
            every shape mismatch.
    """
    problems = [f"{m}: not a target linear layer of this model" for m in adapter.factors if m not in shapes]
    if not adapter.spec.kind_module.EMPTY_INIT:  # full fine-tuning's init stores no weights
        problems += [f"{m}: no adapter weights" for m in shapes if m not in adapter.factors]
    problems += misfits(adapter, {m: s for m, s in shapes.items() if m in adapter.factors})
    if problems:
        raise PissaError(f"the adapter does not fit this model ({len(problems)} problem(s)): " + "; ".join(problems))


def misfits(adapter: Adapter, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """One line per module whose parameters do not have the shapes its kind gives a weight of
    shapes[module] ([out, in]); modules absent from `shapes` are not checked."""
    kind = adapter.spec.kind_module
    problems = []
    for m, params in adapter.factors.items():
        if m not in shapes:
            continue
        want = kind.shapes(adapter.spec, tuple(shapes[m]))
        if tuple(tuple(p.shape) for p in params) != tuple(want):
            have = " / ".join(f"{t.removeprefix('lora_')} {tuple(p.shape)}" for t, p in zip(kind.TENSORS, params))
            problems.append(f"{m}: {have} do not fit weight {tuple(shapes[m])}")
    return problems


def _non_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in ("oversampling", "seed", "dtype", "compute_dtype")}
