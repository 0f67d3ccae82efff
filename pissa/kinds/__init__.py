"""Adapter kinds: what the trainable part of an adapted linear layer is, one module per kind.

Every kind module exposes the same names (the way safetensors' bindings expose the same four
functions per framework), and nothing outside it knows a kind's parameters:

    NAME         the kind's name ("lora", "mora")
    INITS        the AdapterSpec.init values that select it (spec.init picks the kind)
    TENSORS      file names of its parameters, in the order Adapter.factors holds them; the PEFT key
                 of parameter t of module m is "base_model.model.<m>.<t>.weight"
    RESIDUAL     whether its init changes the base weights (PiSSA) or leaves them as they are
    RECORDS_SHAPES  whether its adapters record each weight's [out, in] (when the parameters do not
                 give it), as "shapes" in pissa_config.json
    EMPTY_INIT   whether its init stores no parameters (a module without them starts from its base
                 weight: full fine-tuning)
    OUTPUT       what a finished run writes: "adapter" (RUN_DIR/adapter, and RUN_DIR/lora when it
                 converts) or "model" (RUN_DIR/model, the whole merged model)
    check(spec)                          kind-specific validation of a spec (PissaError)
    scale(spec)                          the factor the update is multiplied by
    shapes(spec, shape)                  the parameter shapes for a weight of shape [out, in]
    misfit(spec, shape)                  why a weight of that shape cannot take this kind, or None
    inconsistent(spec, params)           what is wrong with parameters read from a file, or None
    init(Ws, names, spec, ops)           [Init] for same-shape weights [out, in] (host numpy)
    delta(spec, params, shape)           the dense update dW [out, in] as float64 numpy: the oracle
                                         every backend's forward is tested against
    merged(spec, params, W)              the weight with the adapter merged in (float32)
    peft_fields(spec) / from_peft(cfg)   its extra adapter_config.json fields, both ways (PEFT_KEYS
                                         names them; from_peft returns None for another kind's config)
    converts(spec)                       whether to_lora exists for this spec
    to_lora(initial, trained)            the exact plain LoRA of a trained adapter on the base the
                                         adapter was initialised from, or PissaError when none exists

A backend implements each kind's forward once (a layer class with from_base / fuse, in a table
keyed by NAME). Merging (`pissa merge`) and conversion (`pissa convert`) call the functions above.
Adding a kind is one module here, one entry in KINDS, and one layer per backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from pissa.errors import PissaError


@dataclass
class Init:
    """One weight's initial adapter: its parameters (storage dtype, in TENSORS order), the base
    weight to store [out, in] (the residual for PiSSA, the weight itself otherwise), and the
    top-r singular values when an SVD ran."""

    params: tuple[np.ndarray, ...]
    base: np.ndarray
    spectrum: np.ndarray | None = None


def _registry() -> dict[str, ModuleType]:
    from pissa.kinds import full, lora, mora

    return {m.NAME: m for m in (lora, mora, full)}


def all_inits() -> tuple[str, ...]:
    return tuple(i for kind in _registry().values() for i in kind.INITS)


def get(name: str) -> ModuleType:
    """The kind module called `name`.

    Raises:
        PissaError: for an unknown name.
    """
    kinds = _registry()
    if name not in kinds:
        raise PissaError(f"unknown adapter kind {name!r}; pissa has {', '.join(kinds)}")
    return kinds[name]


def of_init(init: str) -> ModuleType:
    """The kind an init method belongs to ("pissa" -> lora, "mora" -> mora).

    Raises:
        PissaError: for an unknown init method.
    """
    for kind in _registry().values():
        if init in kind.INITS:
            return kind
    raise PissaError(f"unknown init method {init!r}; choose one of {', '.join(all_inits())}")


def names() -> tuple[str, ...]:
    return tuple(_registry())
