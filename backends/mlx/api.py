"""The MLX backend's public verbs over an mlx-lm model: apply, load, merge, unmerge,
adapter_state_dict, save_adapter. Models are changed in place and returned.

Module paths are mlx-lm's, which for Llama-family models are the Hugging Face ones
("model.layers.0.self_attn.q_proj"), so adapters use the same PEFT key names as the torch backend.
Where mlx-lm names a module otherwise (GPT-2: "model.h.0" for transformers' "transformer.h.0"),
targets, adapters and state dicts use the Hugging Face path (peft_path).
Every adapter kind (pissa.adapters.kinds) goes through the same verbs; LAYERS maps a kind to the layer
class that implements its forward.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from pissa_mlx.layer import NOT_QPISSA, QUANTIZED_BASE, QUANTIZED_MERGE, AdapterLinear, FullLinear, PissaLinear, weight_shape
from pissa_mlx.mora import MoraLinear
from pissa_mlx.ops import make_ops

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten
from pissa.adapters import kinds
from pissa.errors import PissaError
from pissa.files.formats import peft as peft_format
from pissa.adapters.adapter import Adapter, check_fits
from pissa.files.layouts import from_mlx_lm_path
from pissa.adapters.spec import AdapterSpec

LAYERS: dict[str, type[AdapterLinear]] = {"lora": PissaLinear, "mora": MoraLinear, "full": FullLinear}


def to_numpy(x: mx.array) -> np.ndarray:
    """A host numpy copy; bfloat16 becomes ml_dtypes.bfloat16 (numpy has no bfloat16 of its own)."""
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(x, copy=True)


def from_numpy(a: np.ndarray) -> mx.array:
    """An mx.array copy of `a` with its dtype (mx.array alone would turn float64 into float32)."""
    a = np.asarray(a)
    return mx.array(a, dtype=mx.float64) if a.dtype == np.float64 else mx.array(a)


def pissa_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(module path, layer) of every adapter layer (PissaLinear, MoraLinear), with PEFT's module
    paths (no "base" suffix)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def peft_path(model: nn.Module):
    """The function giving our (PEFT's) module path for each of this model's mlx-lm paths."""
    model_type = getattr(model, "model_type", None)
    return lambda name: from_mlx_lm_path(model_type, name)


def _some(names: list[str]) -> str:
    return f"{names[0]} (and {len(names) - 1} more)" if len(names) > 1 else names[0]


def _targets(model: nn.Module, spec: AdapterSpec, decompose: bool,
             quantized_residuals: Collection[str]) -> dict[str, nn.Linear]:
    if any(True for _ in pissa_layers(model)):
        raise PissaError("this model already has PiSSA layers (adapters of pissa's kinds); load a fresh model "
                         "to apply another adapter, or fuse the present ones first")
    peft = peft_path(model)
    found = {n: m for n, m in model.named_modules()
             if n and isinstance(m, (nn.Linear, nn.QuantizedLinear)) and spec.matches(peft(n))}
    quantized = [n for n, m in found.items() if isinstance(m, nn.QuantizedLinear)]
    if quantized and decompose:
        raise PissaError(QUANTIZED_BASE.format(name=_some(quantized)))
    # A quantised layer that QPiSSA did not write holds Q(W), not Q(W_res): W + s*B@A would be
    # silently wrong, so only the residuals that the folder's config lists are accepted.
    foreign = [n for n in quantized if n not in set(quantized_residuals)]
    if foreign:
        raise PissaError(NOT_QPISSA.format(name=_some(foreign)))
    if not found:
        raise PissaError(f"targets {spec.describe_targets()} match no nn.Linear of this model; "
                         "use all-linear or module names such as q_proj,v_proj")
    return found


def _freeze_all_but_adapters(model: nn.Module) -> None:
    # Each layer names its own trainable parameters; nothing is matched by name suffix.
    model.freeze()
    for _, layer in pissa_layers(model):
        layer.unfreeze_params()


def adapter_keys(model: nn.Module) -> set[str]:
    """The flattened parameter names ("model.layers.0.self_attn.q_proj.lora_A") of every adapter
    parameter, for code that must tell them from the frozen weights."""
    return {f"{name}.{p}" for name, layer in pissa_layers(model) for p in layer.param_paths()}


def quantized_residuals(model_dir: str | Path) -> set[str]:
    """The modules of a QPiSSA folder whose weights are quantised residuals Q(W_res): config.json's
    "pissa_quantization" "modules" (written by pissa init --quantize); empty for other folders."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return set((config.get("pissa_quantization") or {}).get("modules", ()))


def apply(model: nn.Module, spec: AdapterSpec, adapter: Adapter | None = None,
          device: str | None = None, *, quantized_residuals: Collection[str] = ()) -> nn.Module:
    """Wrap the spec's target nn.Linear layers of `model` in the layer of the spec's adapter kind
    (PissaLinear for PiSSA and LoRA, MoraLinear for MoRA), in place.

    Without `adapter`, each target is initialised now (PiSSA: decomposed with pissa_mlx.ops on
    `device`, default MLX's, and its weight replaced by the residual, so the model computes the
    same function; MoRA: M = 0, the weight unchanged). With `adapter` (e.g. from pissa_init), the
    weights must already be what the init left (the residuals for PiSSA) and no SVD A target may then be an nn.QuantizedLinear holding Q(W_res) if it is named in
    `quantized_residuals` (QPiSSA; see quantized_residuals(model_dir)). Afterwards only the
    adapter parameters are trainable.

    Raises:
        PissaError: when the model already has adapter layers, targets match nothing, a target
            is an nn.QuantizedLinear that is to be
            decomposed (its full-precision weight is gone: QPiSSA decomposes the unquantised
            model in `pissa init --quantize`) or that is not a listed QPiSSA residual, or the
            adapter does not fit the model (every missing module and shape mismatch listed).
    """
    targets = _targets(model, spec, adapter is None, quantized_residuals)
    peft = peft_path(model)
    if adapter is not None:
        check_fits(adapter, {peft(n): weight_shape(m) for n, m in targets.items()})
    ops = None
    kind = spec.kind_module
    wrapped = []
    for name, linear in targets.items():
        w = linear.weight
        if adapter is not None:
            dtype = linear.scales.dtype if isinstance(linear, nn.QuantizedLinear) else w.dtype
            # .get: full fine-tuning's init stores nothing, the layer then trains its own weight
            params = tuple(from_numpy(x).astype(dtype) for x in adapter.factors.get(peft(name), ()))
        else:
            ops = ops or make_ops(device)
            result = kind.init([to_numpy(w.astype(mx.float32))], [peft(name)], spec, ops)[0]
            if kind.changes_base(spec):
                linear.weight = from_numpy(result.base).astype(w.dtype)
            params = tuple(from_numpy(x) for x in result.params)
        wrapped.append((name, LAYERS[spec.kind].from_params(linear, params, spec)))
    model.update_modules(tree_unflatten(wrapped))
    _freeze_all_but_adapters(model)
    mx.eval(model.parameters())
    return model


def load_base(model_dir: str | Path, dtype: mx.Dtype | None = mx.float32) -> nn.Module:
    """The model of a folder, built by mlx-lm (mlx_lm.utils.load_model), without an adapter; its
    floating-point weights cast to `dtype` (None keeps the stored dtype).

    Raises:
        PissaError: a folder that is not a model mlx-lm reads.
    """
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(Path(model_dir))
    except (FileNotFoundError, ValueError) as e:
        raise PissaError(f"mlx-lm cannot load {model_dir} ({e})") from None
    if dtype is not None:
        model.set_dtype(dtype)
    return model


def load(model_dir: str | Path, adapter_dir: str | Path | None = None, *,
         dtype: mx.Dtype | None = mx.float32) -> tuple[nn.Module, AdapterSpec]:
    """A residual model folder plus an adapter folder (default MODEL_DIR/pissa_init), no SVD.
    A QPiSSA folder (`pissa init --quantize affine4|int8`) loads with its quantised residuals as
    nn.QuantizedLinear bases (mlx-lm reads the layout); `dtype` then applies to their scales.

    Returns:
        (model, spec): the mlx-lm model with PissaLinear layers, weights in `dtype`.

    Raises:
        PissaError: a folder that is not a model mlx-lm reads, or an adapter that does not fit.
    """
    adapter = peft_format.load_adapter(adapter_dir or Path(model_dir) / "pissa_init")
    model = load_base(model_dir, dtype)
    apply(model, adapter.spec, adapter, quantized_residuals=quantized_residuals(model_dir))
    return model, adapter.spec


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight (forward unchanged, faster). unmerge() undoes it.

    Raises:
        PissaError: when a layer has a quantised base (QPiSSA), before any layer is merged.
    """
    quantized = [name for name, layer in pissa_layers(model) if layer.quantized]
    if quantized:
        raise PissaError(QUANTIZED_MERGE.format(name=_some(quantized)))
    for _, layer in pissa_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in pissa_layers(model):
        layer.unmerge()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, mx.array]:
    """{file key: mx.array}, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    -> A [r, in]; "...lora_B.weight" -> B [out, r] (PEFT's orientation, not mlx-lm's); the kind's
    tensor names for other kinds (pissa.adapters.kinds)."""
    out, peft = {}, peft_path(model)
    for name, layer in pissa_layers(model):
        for t, p in zip(kinds.get(layer.KIND).TENSORS, layer.params()):
            out[peft_format.tensor_key(peft(name), t)] = p
    return out


def adapter_of(model: nn.Module, spec: AdapterSpec, info: dict | None = None) -> Adapter:
    """The model's current adapter parameters as a core Adapter, in the spec's storage dtype."""
    from pissa.numeric.dtypes import np_dtype

    dt, peft = np_dtype(spec.dtype), peft_path(model)
    factors = {peft(name): tuple(to_numpy(p.astype(mx.float32)).astype(dt) for p in layer.params())
               for name, layer in pissa_layers(model)}
    return Adapter(spec, factors, info=dict(info or {}))


def save_adapter(model: nn.Module, path: str | Path, spec: AdapterSpec, info: dict | None = None) -> None:
    """Write the model's adapter as a PEFT folder at `path` (created; written atomically); the
    torch backend and PEFT load it."""
    from pissa.files.formats.hf import atomic_dir

    with atomic_dir(Path(path), force=True) as tmp:
        peft_format.save_adapter(tmp, adapter_of(model, spec, info))
