"""Adapter kinds (`pissa init --kind`): what the trainable part of an adapted linear layer computes,
one module per kind, found by a registry that imports every module of this package, so adding a
kind is one module here plus one layer per backend (pissa_torch.layers, pissa_mlx.layers).

Every kind module exposes the same names (the way safetensors' bindings expose the same four
functions per framework), and nothing outside it knows a kind's parameters:

    NAME         the kind's name ("lora", "mora", ...); HELP, a few words for --help
    LORA_SHAPED  whether it trains PEFT's LoRA pair A, B and so starts from an init
                 (pissa.adapters.inits: pissa, pissa-fast, lora, ...); other kinds have no init
    OPTIONS      {name: Option} of its own spec options (MoRA's "mora_type"), each also a CLI flag
    TENSORS      file names of its parameters, in the order Adapter.factors holds them; the PEFT key
                 of parameter t of module m is "base_model.model.<m>.<t>" + KEY_SUFFIX.get(t, ".weight")
    KEY_SUFFIX   the parameters whose file key does not end in ".weight" (DoRA's magnitude)
    MLX_LM       (fine_tune_type, {tensor: mlx-lm's leaf name}) of its mlx-lm adapter form, or None
                 when mlx-lm has no layer for it (pissa.files.formats.mlx_lm)
    RECORDS_SHAPES  whether its adapters record each weight's [out, in] (when the parameters do not
                 give it), as "shapes" in pissa_config.json
    EMPTY_INIT   whether its init stores no parameters (a module without them starts from its base
                 weight: full fine-tuning)
    RANKED       whether --rank shapes it (not for full fine-tuning)
    OUTPUT       what a finished run writes: "adapter" (RUN_DIR/adapter, and RUN_DIR/lora when it
                 converts) or "model" (RUN_DIR/model, the whole merged model)
    check(spec)                          kind-specific validation of a spec (PissaError)
    scale(spec)                          the factor the update is multiplied by
    changes_base(spec)                   whether its init changes the base weights (PiSSA's residual)
    shapes(spec, shape)                  the parameter shapes for a weight of shape [out, in]
    misfit(spec, shape)                  why a weight of that shape cannot take this kind, or None
    inconsistent(spec, params)           what is wrong with parameters read from a file, or None
    init(Ws, names, spec, ops)           [Start] for same-shape weights [out, in] (host numpy)
    merged(spec, params, W)              the weight with the adapter merged in, computed in W's
                                         float dtype (float64: the oracle every backend's forward
                                         is tested against; float32: what `pissa merge` writes)
    peft_fields(spec) / from_peft(cfg)   its extra adapter_config.json fields, both ways (PEFT_KEYS
                                         names them; from_peft returns None for another kind's config)
    converts(spec)                       whether to_lora exists for this spec
    to_lora(initial, trained)            the exact plain LoRA of a trained adapter on the base the
                                         adapter was initialised from, or PissaError when none exists
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from pissa.adapters.registry import Registry

ORDER = ("lora", "dora", "mora", "full")  # how help texts list them; others follow


@dataclass(frozen=True)
class Option:
    """A kind's own spec option: its default, the values it takes, and its --help text."""

    default: str
    choices: tuple[str, ...]
    help: str


_REGISTRY = Registry(__name__, __path__, ORDER, "adapter kind")
names, get = _REGISTRY.names, _REGISTRY.get


def options() -> dict[str, tuple[str, Option]]:
    """Every kind's options: option name -> (kind name, Option)."""
    return {opt: (name, o) for name, kind in _REGISTRY.entries.items() for opt, o in kind.OPTIONS.items()}


def init_alias(init: str | None) -> str | None:
    """The kind an --init name stands for, for the kinds that have no init (`--init mora` is
    `--kind mora`, `--init full` is `--kind full`), or None."""
    kind = _REGISTRY.entries.get(init) if init else None
    return init if kind is not None and not kind.LORA_SHAPED else None


def key_suffix(kind: ModuleType, tensor: str) -> str:
    return getattr(kind, "KEY_SUFFIX", {}).get(tensor, ".weight")
