"""Adapters on a model of any backend: the verbs apply, merge, unmerge, adapter_state_dict,
adapter_of, written once over the Backend protocol (pissa.numeric.backend). pissa_torch and
pissa_mlx expose them bound to themselves (`pissa_torch.apply(model, spec)`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

from pissa.adapters.adapter import Adapter, check_fits
from pissa.adapters.kinds import key_suffix
from pissa.adapters.spec import AdapterSpec
from pissa.errors import PissaError
from pissa.numeric.dtypes import np_dtype
from pissa.numeric.ops import get_ops

QUANTIZED_BASE = ("quantised base layer {name}: PiSSA needs the full-precision weight to decompose; run QPiSSA "
                  "on the unquantised model instead: pissa init MODEL --quantize {scheme}, then load that folder")
NOT_QPISSA = ("quantised base layer {name} is not a QPiSSA residual (the folder's config.json lists no "
              "pissa_quantization module of that name); load a folder written by pissa init --quantize, or run "
              "pissa init on the unquantised model")
QUANTIZED_MERGE = ("{name} has a quantised base (QPiSSA): merging would requantise it and change the model; "
                   "use fuse() for a full-precision layer, or pissa merge for a full-precision model folder")
PREFIX = "base_model.model."  # PEFT's tensor names: base_model.model.<module>.<parameter>


def _some(names: list[str]) -> str:
    return f"{names[0]} (and {len(names) - 1} more)" if len(names) > 1 else names[0]


def apply(backend, model: Any, spec: AdapterSpec, adapter: Adapter | None = None, device: str | None = None, *,
          quantized_residuals: Collection[str] | None = None) -> Any:
    """Wrap the spec's target linear layers of `model` in the backend's layer of the spec's kind,
    in place, and freeze everything else.

    Without `adapter`, each target is initialised now with the backend's Ops on `device` (PiSSA:
    decomposed, its weight replaced by the residual, so the model computes the same function;
    MoRA: M = 0, the weight unchanged). With `adapter` (e.g. from pissa_init) the weights must
    already be what the init left, and no SVD runs. A quantised target is accepted only with an
    adapter, and only if `quantized_residuals` (a folder's QPiSSA modules, what pissa.files.models
    .load passes) names it: a quantised layer QPiSSA did not write holds Q(W), not Q(W_res).

    Raises:
        PissaError: when the model already has adapter layers, the targets match nothing, a
            quantised target is to be decomposed or is no QPiSSA residual, or the adapter does not
            fit the model (every missing module and shape mismatch listed at once).
    """
    be = backend
    if spec.dtype is None:
        spec = dataclasses.replace(spec, dtype="float32")
    if any(True for _ in be.adapter_layers(model)):
        raise PissaError("this model already has PiSSA layers (adapters of pissa's kinds); load a fresh model "
                         "to apply another adapter, or fuse the present ones first")
    targets = be.targets(model, spec)
    quantized = [n for n, m in targets.items() if be.is_quantized(m)]
    if quantized and adapter is None:
        raise PissaError(QUANTIZED_BASE.format(name=_some(quantized), scheme=be.qpissa_scheme))
    foreign = [n for n in quantized if n not in set(quantized_residuals or ())]
    if foreign:
        raise PissaError(NOT_QPISSA.format(name=_some(foreign)))
    if adapter is not None:
        check_fits(adapter, {n: be.weight_shape(m) for n, m in targets.items()})
    kind, layer, ops = spec.kind_module, be.layer(spec.kind), None
    wrapped = []
    for name, base in targets.items():
        if adapter is not None:
            # .get: full fine-tuning's init stores nothing; the layer then trains its own weight.
            params = tuple(be.from_numpy(x, like=base) for x in adapter.factors.get(name, ()))
        else:
            ops = ops or get_ops(be.name, device)
            start = kind.init([be.read_weight(base)], [name], spec, ops)[0]
            if kind.changes_base(spec):
                be.write_weight(base, start.base)
            params = tuple(be.from_numpy(x, like=base) for x in start.params)
        wrapped.append((name, layer.from_params(base, params, spec.for_module(name))))
    be.replace(model, wrapped)
    be.freeze(model)
    return model


def merge(backend, model: Any) -> Any:
    """Fold every adapter's update into its base weight (the forward is unchanged, and faster);
    unmerge() undoes it.

    Raises:
        PissaError: when a layer has a quantised base (QPiSSA), before any layer is merged.
    """
    layers = list(backend.adapter_layers(model))
    quantized = [name for name, layer in layers if layer.quantized]
    if quantized:
        raise PissaError(QUANTIZED_MERGE.format(name=_some(quantized)))
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(backend, model: Any) -> Any:
    for _, layer in backend.adapter_layers(model):
        layer.unmerge()
    return model


def adapter_state_dict(backend, model: Any) -> dict[str, Any]:
    """{PEFT tensor name: the backend's array}, e.g. "base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight" -> A [r, in] (PEFT's orientation, whatever the framework's own)."""
    out = {}
    for name, layer in backend.adapter_layers(model):
        kind = _kind_of(layer)
        for t, p in zip(kind.TENSORS, layer.params()):
            out[f"{PREFIX}{name}.{t}{key_suffix(kind, t)}"] = backend.detach(p)
    return out


def adapter_of(backend, model: Any, spec: AdapterSpec, info: dict | None = None, dtype: str | None = None) -> Adapter:
    """The model's adapter parameters now, as a core Adapter in `dtype` (default: the spec's
    storage dtype; a checkpoint asks for float32, the master weights as they are)."""
    dt = np_dtype(dtype or spec.dtype or "float32")
    factors = {name: tuple(backend.to_numpy(p).astype(np_dtype("float32")).astype(dt) for p in layer.params())
               for name, layer in backend.adapter_layers(model)}
    return Adapter(spec, factors, info=dict(info or {}))


def _kind_of(layer):
    from pissa.adapters import kinds

    return kinds.get(layer.KIND)
