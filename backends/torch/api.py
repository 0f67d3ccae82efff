"""The torch backend's public verbs over a transformers model: apply, load, merge, unmerge,
adapter_state_dict, save_adapter. Models are changed in place and returned.

Every adapter kind (pissa.adapters.kinds) goes through the same verbs; LAYERS maps a kind to the layer
class that implements its forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
import torch
from torch import nn

from pissa.adapters import kinds
from pissa.errors import PissaError
from pissa.files.formats import peft as peft_format
from pissa.adapters.adapter import Adapter
from pissa.adapters.adapter import check_fits as _check_fits
from pissa.adapters.spec import AdapterSpec
from pissa_torch.layer import AdapterLinear, FullLinear, PissaLinear, dense_weight, weight_shape
from pissa_torch.mora import MoraLinear
from pissa_torch.ops import make_ops
from pissa_torch.quantized import AffineQuantLinear, compute_dtype, is_quantized, load_base


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 becomes ml_dtypes.bfloat16 (numpy has no bfloat16 of its own).
    A parameter sharded by FSDP2 (a DTensor) is gathered whole first: every rank must call this."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
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


LAYERS: dict[str, type[AdapterLinear]] = {"lora": PissaLinear, "mora": MoraLinear, "full": FullLinear}


def pissa_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(module path, layer) of every adapter layer (PissaLinear, MoraLinear), with PEFT's module
    paths (no "base" suffix)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def _targets(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Module]:
    # nn.Linear covers bitsandbytes' Linear4bit, a subclass; Conv1D is GPT-2's linear layer.
    from transformers.pytorch_utils import Conv1D

    found = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, AffineQuantLinear, Conv1D)) and spec.matches(n)}
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
    # Each layer names its own trainable parameters; nothing is matched by name suffix.
    model.requires_grad_(False)
    for _, layer in pissa_layers(model):
        for p in layer.params():
            p.requires_grad_(True)


@torch.no_grad()
def apply(model: nn.Module, spec: AdapterSpec, adapter: Adapter | None = None,
          device: str | None = None) -> nn.Module:
    """Wrap the spec's target nn.Linear layers of `model` in the layer of the spec's adapter kind
    (PissaLinear for PiSSA and LoRA, MoraLinear for MoRA), in place.

    Without `adapter`, each target is initialised now (PiSSA: decomposed on `device`, default the
    weight's, and its weight replaced by the residual, so the model computes the same function;
    MoRA: M = 0, the weight unchanged). With `adapter` (e.g. from pissa_init), the weights must
    already be what the init left (the residuals for PiSSA) and no SVD runs. Afterwards only the
    adapter parameters are trainable. Quantised targets (a QPiSSA residual, see
    pissa_torch.quantized) need `adapter`; their factors take the layer's compute dtype.

    Raises:
        PissaError: when the model already has adapter layers, targets match nothing, the adapter
            does not fit the model (every missing module and shape mismatch listed at once), or a
            quantised target has no adapter.
    """
    if any(True for _ in pissa_layers(model)):
        raise PissaError("this model already has PiSSA layers (adapters of pissa's kinds); load a fresh model "
                         "to apply another adapter, or fuse the present ones first")
    targets = _targets(model, spec)
    if adapter is not None:
        _check_fits(adapter, {n: weight_shape(m) for n, m in targets.items()})
    elif any(is_quantized(m) for m in targets.values()):
        raise PissaError("this model's target layers are quantised, and PiSSA cannot start from a quantised "
                         "weight; run `pissa init --quantize` on the unquantised model and load that folder")
    kind = spec.kind_module
    for name, linear in targets.items():
        if adapter is not None:
            # .get: full fine-tuning's init stores nothing, the layer then trains its own weight
            params = tuple(from_numpy(x).to(compute_dtype(linear)) for x in adapter.factors.get(name, ()))
        else:
            w = dense_weight(linear)  # [out, in], a view of a Conv1D's [in, out] weight
            ops = make_ops(device or str(w.device))
            result = kind.init([to_numpy(w.float())], [name], spec, ops)[0]
            if kind.changes_base(spec):
                w.copy_(from_numpy(result.base).to(w.dtype))
            params = tuple(from_numpy(x) for x in result.params)
        _replace(model, name, LAYERS[spec.kind].from_params(linear, params, spec))
    _freeze_all_but_adapters(model)
    return model


def load(model_dir: str | Path, adapter_dir: str | Path | None = None, *, device: str | None = None,
         dtype: torch.dtype = torch.float32) -> tuple[nn.Module, AdapterSpec]:
    """A pissa init folder (the residual model, or the unchanged base for MoRA) plus an adapter
    folder (default MODEL_DIR/pissa_init), no SVD.

    The folder may hold a quantised residual (`pissa init --quantize`): nf4 loads as bitsandbytes
    Linear4bit layers, int8 / affine4 as AffineQuantLinear (pissa_torch.quantized.load_base).

    Returns:
        (model, spec): the transformers model with adapter layers, on `device`.
    """
    adapter = peft_format.load_adapter(adapter_dir or Path(model_dir) / "pissa_init")
    model = load_base(model_dir, dtype=dtype, device=device)
    apply(model, adapter.spec, adapter)
    return model, adapter.spec


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's update into its base weight (forward unchanged, faster). unmerge()
    undoes it."""
    for _, layer in pissa_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in pissa_layers(model):
        layer.unmerge()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{file key: tensor}, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    (the kind's tensor names: pissa.adapters.kinds)."""
    out = {}
    for name, layer in pissa_layers(model):
        for t, p in zip(kinds.get(layer.KIND).TENSORS, layer.params()):
            out[peft_format.tensor_key(name, t)] = p.detach()
    return out


def adapter_of(model: nn.Module, spec: AdapterSpec, info: dict | None = None) -> Adapter:
    """The model's current adapter parameters as a core Adapter, in the spec's storage dtype."""
    from pissa.numeric.dtypes import np_dtype

    dt = np_dtype(spec.dtype)
    factors = {name: tuple(to_numpy(p.float()).astype(dt) for p in layer.params())
               for name, layer in pissa_layers(model)}
    return Adapter(spec, factors, info=dict(info or {}))


def save_adapter(model: nn.Module, path: str | Path, spec: AdapterSpec, info: dict | None = None) -> None:
    """Write the model's adapter as a PEFT folder at `path` (created; written atomically)."""
    from pissa.files.formats.hf import atomic_dir

    with atomic_dir(Path(path), force=True) as tmp:
        peft_format.save_adapter(tmp, adapter_of(model, spec, info))
