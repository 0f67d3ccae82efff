"""The torch backend's public verbs over a transformers model: apply, load, merge, unmerge,
adapter_state_dict, save_adapter. Models are changed in place and returned."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
import torch
from torch import nn

from pissa.decompose import decompose_many
from pissa.errors import PissaError
from pissa.formats import peft as peft_format
from pissa.formats.peft import Adapter
from pissa.formats.peft import check_fits as _check_fits
from pissa.spec import AdapterSpec
from pissa_torch.layer import PissaLinear
from pissa_torch.ops import make_ops
from pissa_torch.quantized import AffineQuantLinear, compute_dtype, is_quantized, load_base


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 becomes ml_dtypes.bfloat16 (numpy has no bfloat16 of its own)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor that owns a copy of `a`. Never torch.from_numpy's shared memory: training would
    then rewrite the caller's arrays (the initial adapter) in place."""
    a = np.array(a, copy=True, order="C")
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def pissa_layers(model: nn.Module) -> Iterator[tuple[str, PissaLinear]]:
    """(module path, layer) of every PissaLinear, with PEFT's module paths (no "base" suffix)."""
    for name, module in model.named_modules():
        if isinstance(module, PissaLinear):
            yield name, module


def _targets(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Module]:
    # nn.Linear covers bitsandbytes' Linear4bit, a subclass.
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, AffineQuantLinear)) and spec.matches(n)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec.targets == "all-linear" and output is not None:
        found = {n: m for n, m in found.items() if m is not output}
    if not found:
        raise PissaError(f"targets {spec.describe_targets()} match no nn.Linear of this model; "
                         "use all-linear or module names such as q_proj,v_proj")
    return found


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))


@torch.no_grad()
def apply(model: nn.Module, spec: AdapterSpec, adapter: Adapter | None = None,
          device: str | None = None) -> nn.Module:
    """Wrap the spec's target nn.Linear layers of `model` in PissaLinear, in place.

    Without `adapter`, each target is decomposed now (on `device`, default the weight's) and its
    weight replaced by the residual, so the model computes the same function. With `adapter`
    (e.g. from pissa_init), the weights must already be the residuals and no SVD runs.
    Afterwards only lora_A and lora_B are trainable. Quantised targets (a QPiSSA residual,
    see pissa_torch.quantized) need `adapter`; their factors take the layer's compute dtype.

    Raises:
        PissaError: when targets match nothing, the adapter does not fit the model (every
            missing module and shape mismatch listed at once), or a quantised target has no adapter.
    """
    targets = _targets(model, spec)
    if adapter is not None:
        _check_fits(adapter, {n: (m.out_features, m.in_features) for n, m in targets.items()})
    elif any(is_quantized(m) for m in targets.values()):
        raise PissaError("this model's target layers are quantised, and PiSSA cannot start from a quantised "
                         "weight; run `pissa init --quantize` on the unquantised model and load that folder")
    for name, linear in targets.items():
        w = linear.weight
        if adapter is not None:
            A, B = (from_numpy(x).to(compute_dtype(linear)) for x in adapter.factors[name])
        else:
            ops = make_ops(device or str(w.device))
            f = decompose_many([to_numpy(w.float())], [name], spec, ops)[0]
            w.copy_(from_numpy(f.residual).to(w.dtype))
            A, B = from_numpy(f.A), from_numpy(f.B)
        _replace(model, name, PissaLinear.from_base(linear, A, B, spec.scale))
    _freeze_all_but_adapters(model)
    return model


def load(model_dir: str | Path, adapter_dir: str | Path | None = None, *, device: str | None = None,
         dtype: torch.dtype = torch.float32) -> tuple[nn.Module, AdapterSpec]:
    """A residual model folder plus an adapter folder (default MODEL_DIR/pissa_init), no SVD.

    The folder may hold a quantised residual (`pissa init --quantize`): nf4 loads as bitsandbytes
    Linear4bit layers, int8 / affine4 as AffineQuantLinear (pissa_torch.quantized.load_base).

    Returns:
        (model, spec): the transformers model with PissaLinear layers, on `device`.
    """
    adapter = peft_format.load_adapter(adapter_dir or Path(model_dir) / "pissa_init")
    model = load_base(model_dir, dtype=dtype, device=device)
    apply(model, adapter.spec, adapter)
    return model, adapter.spec


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight (forward unchanged, faster). unmerge() undoes it."""
    for _, layer in pissa_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in pissa_layers(model):
        layer.unmerge()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor}, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    out = {}
    for name, layer in pissa_layers(model):
        out[peft_format.key(name, "A")] = layer.lora_A.detach()
        out[peft_format.key(name, "B")] = layer.lora_B.detach()
    return out


def adapter_of(model: nn.Module, spec: AdapterSpec, info: dict | None = None) -> Adapter:
    """The model's current factors as a core Adapter, in the spec's storage dtype."""
    from pissa.formats.safetensors import np_dtype

    dt = np_dtype(spec.dtype)
    factors = {name: (to_numpy(layer.lora_A.float()).astype(dt), to_numpy(layer.lora_B.float()).astype(dt))
               for name, layer in pissa_layers(model)}
    return Adapter(spec, factors, info=dict(info or {}))


def save_adapter(model: nn.Module, path: str | Path, spec: AdapterSpec, info: dict | None = None) -> None:
    """Write the model's adapter as a PEFT folder at `path` (created; written atomically)."""
    from pissa.formats.hf import atomic_dir

    with atomic_dir(Path(path), force=True) as tmp:
        peft_format.save_adapter(tmp, adapter_of(model, spec, info))
