"""AdapterSpec: what to adapt and how to initialise it, with a lossless PEFT config round trip.

Orientation used everywhere in pissa (written down once): W is [out, in], A is [r, in],
B is [out, r], and the layer computes y = x W^T + s * (x A^T) B^T with s = alpha / r
(alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pissa.errors import PissaError
from pissa.numeric.dtypes import COMPUTE_DTYPES, STORAGE_DTYPES

ALL_LINEAR = "all-linear"
DEFAULT_INIT = "pissa"
DEFAULT_RANK = 16

# Module names that "all-linear" never adapts: embeddings and the output layer (PEFT does the same).
_NOT_LINEAR = re.compile(r"(^|\.)(embed_tokens|embed_positions|wte|wpe|tokens_embed|positions_embed|lm_head|"
                         r"embed_out|output)$")
_REGEX_CHARS = set(".*+?[](){}|^$\\")

# What we write into adapter_config.json: the fields that say what a LoRA computes and where
# (REFERENCE.md section 4), each known to every PEFT release since 0.13, so no PEFT the pins allow
# warns about an unknown key; PEFT fills every other field with its own default when it loads ours.
_PEFT_WRITTEN: dict[str, Any] = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": 8,
    "lora_alpha": 8, "use_rslora": False, "target_modules": None, "init_lora_weights": True,
    "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_dora": False,
    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
}
# Keys read as metadata: any value leaves what the adapter computes unchanged.
_PEFT_METADATA = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "runtime_config", "megatron_core",
}
# Keys pissa reads and applies.
_PEFT_READ = {
    "r", "lora_alpha", "use_rslora", "target_modules", "init_lora_weights", "lora_dropout", "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",  # about the base layer (GPT-2's Conv1D), not the adapter: pissa.files.formats.peft keeps it
}
# Any other key, one PEFT has today or adds tomorrow (a "<method>_config" in most releases), is
# accepted only at the value PEFT writes while its feature is off: null, false, zero, empty, or
# PEFT's default where that is something else (the keys listed here, peft 0.22).
_PEFT_OFF: dict[str, Any] = {"bias": "none", "qalora_group_size": 16}
_PEFT_EMPTY = (None, {}, [], "", False)  # 0 and 0.0 compare equal to False


def _peft_key_is_off(key: str, value: Any) -> bool:
    return value in _PEFT_EMPTY or (key in _PEFT_OFF and value == _PEFT_OFF[key])


@dataclass(frozen=True)
class AdapterSpec:
    """A validated description of an adapter: what its layers compute (kind), how a LoRA-shaped
    one starts (init), and where it goes (targets).

    Args:
        rank: r, the adapter rank (> 0). It must not exceed min(in, out) of any target;
            that is checked when the targets are resolved against a model.
        alpha: the LoRA alpha (> 0); None means alpha = rank, the paper's setting.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        targets: "all-linear", a tuple of module names (a module matches when its path equals
            a name or ends with "." + name, PEFT's list semantics), or one regular expression
            that must match the whole module path (PEFT's string semantics).
        kind: what an adapted layer computes (pissa.adapters.kinds): "lora" (PEFT's A and B),
            "dora", "mora" or "full".
        init: how a LoRA-shaped kind starts (pissa.adapters.inits): "pissa" (full SVD, the
            default), "pissa-fast" (randomised SVD), "lora" (LoRA's own), "olora", "milora"; None
            for the kinds without an init (mora, full). "mora" and "full" are accepted as aliases
            of kind="mora" and kind="full" (the command line's --init mora of old).
        niter: power iterations of the randomised SVD (>= 0).
        oversampling: extra columns of the randomised SVD's test matrix (>= 0).
        seed: seeds the core's numpy Generator that draws every random matrix.
        dtype: storage dtype of the adapter and the residual model; None (pissa init's default)
            is the input model's own (pissa.files.loaders: ModelSource.storage_dtype), and means
            float32 where there is no input model to follow (apply() on a model in memory).
        compute_dtype: dtype of the decomposition; float64 makes every backend agree.
        dropout: dropout on the adapter's input in training (PEFT's lora_dropout), in [0, 1).
        options: the kind's own options (the kind's OPTIONS: MoRA's "mora_type"); the others
            take their defaults.
        rank_pattern, alpha_pattern: per-module ranks and alphas, as PEFT's: a module takes the
            value of the first key (a regular expression) matching the end of its path at a dot
            (PEFT's get_pattern_key), else `rank` / `alpha`; for_module() gives its own spec. For
            the LoRA-shaped kinds.

    Raises:
        PissaError: for any invalid value, naming the field and the fix.
    """

    rank: int = DEFAULT_RANK
    alpha: float | None = None
    use_rslora: bool = False
    targets: str | tuple[str, ...] = ALL_LINEAR
    kind: str = "lora"
    init: str | None = None
    niter: int = 4
    oversampling: int = 8
    seed: int = 0
    dtype: str | None = "float32"
    compute_dtype: str = "float64"
    dropout: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pissa.adapters import inits, kinds

        _check_int("rank", self.rank, minimum=1)
        alpha = float(self.rank if self.alpha is None else self.alpha)
        if not (isinstance(self.alpha, (int, float, type(None))) and not isinstance(self.alpha, bool)):
            raise PissaError(f"alpha must be a number, got {self.alpha!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise PissaError(f"alpha must be > 0, got {self.alpha}; pass a positive --alpha (default: the rank)")
        object.__setattr__(self, "alpha", alpha)
        if not isinstance(self.use_rslora, bool):
            raise PissaError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        object.__setattr__(self, "targets", _normalise_targets(self.targets))
        for name in ("kind", "init"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise PissaError(f"{name} must be a name, got {getattr(self, name)!r}")
        alias = kinds.init_alias(self.init)
        if alias is not None:  # --init mora / --init full: the kinds that have no init
            if self.kind not in ("lora", alias):
                raise PissaError(f"--init {alias} is --kind {alias}, which conflicts with --kind {self.kind}")
            object.__setattr__(self, "kind", alias)
            object.__setattr__(self, "init", None)
        kind = kinds.get(self.kind)
        if kind.LORA_SHAPED:
            object.__setattr__(self, "init", self.init or DEFAULT_INIT)
            inits.get(self.init)  # PissaError for an unknown init
        elif self.init is not None:
            shaped = ", ".join(n for n in kinds.names() if kinds.get(n).LORA_SHAPED)
            raise PissaError(f"--init {self.init} is for the LoRA-shaped kinds ({shaped}); --kind {self.kind} "
                             "has no init: drop --init")
        object.__setattr__(self, "options", _normalise_options(kind, self.options))
        for name, kind_of in (("rank_pattern", int), ("alpha_pattern", float)):
            object.__setattr__(self, name, _normalise_pattern(name, getattr(self, name), kind_of))
        if (self.rank_pattern or self.alpha_pattern) and not kind.LORA_SHAPED:
            raise PissaError(f"per-module ranks and alphas are for the LoRA-shaped kinds; --kind {self.kind} takes "
                             "one --rank: drop the patterns")
        _check_int("niter", self.niter, minimum=0)
        _check_int("oversampling", self.oversampling, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise PissaError(f"unknown storage dtype {self.dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise PissaError(
                f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise PissaError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        kind.check(self)

    # ------------------------------------------------------------------ the two axes
    @property
    def kind_module(self):
        """The pissa.adapters.kinds module of this spec's kind."""
        from pissa.adapters import kinds

        return kinds.get(self.kind)

    @property
    def init_module(self):
        """The pissa.adapters.inits module of this spec's init, or None for a kind without one."""
        from pissa.adapters import inits

        return inits.get(self.init) if self.init is not None else None

    def for_module(self, module: str) -> "AdapterSpec":
        """The spec of one module: its rank and alpha from rank_pattern / alpha_pattern (the first
        key whose regular expression matches the end of the module path at a dot, as PEFT's
        get_pattern_key), else the spec's own; no patterns left. The spec itself when it has none."""
        if not (self.rank_pattern or self.alpha_pattern):
            return self
        rank = _pattern_value(self.rank_pattern, module, self.rank)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return dataclasses.replace(self, rank=rank, alpha=alpha, rank_pattern={}, alpha_pattern={})

    def option(self, name: str) -> Any:
        """The value of one of the kind's options (its default when not given)."""
        return self.options[name]

    def describe(self) -> str:
        """The kind and init in words: "pissa", "dora (pissa-fast)", "mora (rotation)", "full"."""
        if self.kind == "lora":
            return self.init
        extra = [self.init] if self.init else []
        extra += [str(v) for v in self.options.values()]
        return f"{self.kind} ({', '.join(extra)})" if extra else self.kind

    # ------------------------------------------------------------------ scale and targets
    @property
    def scale(self) -> float:
        """s in W = W_res + s * B @ A (1 for MoRA, whose update has no scale)."""
        return self.kind_module.scale(self)

    def matches(self, module: str) -> bool:
        """Whether the module path (e.g. "model.layers.0.self_attn.q_proj") is a target."""
        if self.targets == ALL_LINEAR:
            return not _NOT_LINEAR.search(module)
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module) is not None
        return any(module == t or module.endswith("." + t) for t in self.targets)

    def resolve(self, weights: Mapping[str, tuple[int, ...]]) -> list[str]:
        """The target module paths among a model's weights, in the model's order.

        Args:
            weights: tensor name -> shape for the whole model (names end in ".weight").

        Raises:
            PissaError: when nothing matches, or the rank exceeds min(out, in) of a target.
        """
        found = [
            name[: -len(".weight")]
            for name, shape in weights.items()
            if name.endswith(".weight") and len(shape) == 2 and self.matches(name[: -len(".weight")])
        ]
        if not found:
            raise PissaError(
                f"targets {self.describe_targets()} match no linear layer of this model; "
                "pass --targets all-linear or module names such as q_proj,v_proj")
        misfits = [(m, why) for m in found
                   if (why := self.kind_module.misfit(self.for_module(m), tuple(weights[m + ".weight"]))) is not None]
        if misfits:
            m, why = misfits[0]
            raise PissaError(
                f"{why} for {len(misfits)} target(s), e.g. {m} {tuple(weights[m + '.weight'])}; "
                "pass a different --rank or narrower --targets")
        return found

    def describe_targets(self) -> str:
        return self.targets if isinstance(self.targets, str) else ",".join(self.targets)

    # ------------------------------------------------------------------ dict round trips
    def to_dict(self) -> dict[str, Any]:
        """pissa_config.json's "spec": every field, the kind's options among them by name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d.update(self.options)
        d["rank_pattern"], d["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        if isinstance(self.targets, tuple):
            d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterSpec":
        """Build a spec from to_dict()'s output, or from the one files written before kind and init
        were two axes held ({"init": "mora", "mora_type": ...}: no "kind", MoRA's type at the top).

        Raises:
            PissaError: for unknown keys.
        """
        from pissa.adapters import kinds

        fields = {f.name for f in dataclasses.fields(cls)} - {"options"}
        option_names = set(kinds.options())
        unknown = sorted(set(d) - fields - option_names)
        if unknown:
            raise PissaError(f"unknown adapter spec key(s) {unknown}; known keys are {sorted(fields | option_names)}")
        values = {k: v for k, v in d.items() if k in fields}
        options = {k: v for k, v in d.items() if k in option_names}
        kind = values.get("kind") or kinds.init_alias(values.get("init")) or "lora"
        values["options"] = {k: v for k, v in options.items() if kinds.options()[k][0] == kind}
        return cls(**values)

    @property
    def peft_init(self) -> bool | str:
        """PEFT's init_lora_weights for this init method (before the adapter exists)."""
        return self.init_module.peft(self) if self.init_module is not None else True

    def to_peft_config(self, *, initialized: bool = True, base_model: str | None = None) -> dict[str, Any]:
        """PEFT's adapter_config.json for this spec.

        With initialized=True (what we write next to saved weights), init_lora_weights is true so
        PEFT loads the weights instead of running the SVD again. The fields PEFT has no key for
        (oversampling, seed, dtype, compute_dtype, and the init method once initialized) go in
        "pissa_config.json" beside it via to_dict(); from_peft_config() takes them back as extras.
        """
        cfg = dict(_PEFT_WRITTEN)
        cfg.update(
            base_model_name_or_path=base_model,
            r=self.rank,
            lora_alpha=_plain_number(self.alpha),
            use_rslora=self.use_rslora,
            target_modules=self.targets if isinstance(self.targets, str) else sorted(self.targets),
            init_lora_weights=True if initialized else self.peft_init,
            lora_dropout=_plain_number(self.dropout),
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern={k: _plain_number(v) for k, v in self.alpha_pattern.items()},
        )
        cfg.update(self.kind_module.peft_fields(self))
        return cfg

    @classmethod
    def from_peft_config(cls, cfg: Mapping[str, Any], extras: Mapping[str, Any] | None = None) -> "AdapterSpec":
        """Parse PEFT's adapter_config.json (plus our pissa_config.json extras, if any).

        A key pissa does not read, known to PEFT or not (PEFT adds one in most releases), is
        accepted at the value PEFT writes while its feature is off (null, false, zero, empty or
        PEFT's default), and refused at any other value: then it changes what the adapter computes.

        Raises:
            PissaError: for another peft_type, a missing r or target_modules, and any key pissa
                does not read (layers_to_transform, lora_bias, a newer PEFT's "<method>_config", ...)
                set to a value other than off, naming each.
        """
        from pissa.adapters import inits, kinds

        if cfg.get("peft_type", "LORA") != "LORA":
            raise PissaError(f"peft_type {cfg['peft_type']!r} is not supported; pissa reads LORA adapters")
        kind_keys = {k for name in kinds.names() for k in kinds.get(name).PEFT_KEYS}
        active = [k for k, v in sorted(cfg.items()) if k not in _PEFT_METADATA | _PEFT_READ | kind_keys
                  and not _peft_key_is_off(k, v)]
        if active:
            sets = ", ".join(f"{k}={_short(json.dumps(cfg[k]))}" for k in active)
            raise PissaError(f"adapter_config.json sets {sets}: a PEFT feature pissa does not implement, which "
                             "changes what the adapter computes; use PEFT for this adapter, or set it to null if it "
                             "is meant to be off")
        if "r" not in cfg or "target_modules" not in cfg:
            raise PissaError("adapter_config.json lacks 'r' or 'target_modules'; is this a PEFT LoRA adapter?")
        fields: dict[str, Any] = dict(extras or {})
        kind_fields = next(filter(None, (kinds.get(name).from_peft(cfg) for name in kinds.names())), None)
        fields.update(kind_fields or {})
        if kinds.get(fields.get("kind", "lora")).LORA_SHAPED:
            found = inits.from_peft(cfg.get("init_lora_weights", True))
            if found["init"] == "lora":  # trained or converted adapters say true too: keep the extras' init
                found = {"init": fields.get("init") or "lora"}
            fields.update(found)
        fields.update(rank=cfg["r"], alpha=cfg.get("lora_alpha", 8), use_rslora=cfg.get("use_rslora", False),
                      targets=cfg["target_modules"], dropout=cfg.get("lora_dropout") or 0.0,
                      rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {})
        return cls.from_dict(fields)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PissaError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PissaError(f"{name} must be >= {minimum}, got {value}; pass --{name} {max(minimum, 1)} or more")


def _normalise_targets(targets: Any) -> str | tuple[str, ...]:
    if isinstance(targets, str):
        if not targets:
            raise PissaError("targets is empty; pass --targets all-linear or module names")
        if targets == ALL_LINEAR:
            return targets
        try:
            re.compile(targets)
        except re.error as e:
            raise PissaError(f"targets {targets!r} is not a valid regular expression ({e})") from None
        return targets
    if isinstance(targets, Iterable):
        names = tuple(dict.fromkeys(str(t) for t in targets))
        if not names or any(not n for n in names):
            raise PissaError(f"targets {list(targets)!r} is empty or has an empty name")
        return names
    raise PissaError(f"targets must be a string or a list of module names, got {targets!r}")


def parse_targets(text: str) -> str | tuple[str, ...]:
    """CLI form: "all-linear", "q_proj,v_proj" (names), or a regex (any regex metacharacter)."""
    if text == ALL_LINEAR or _REGEX_CHARS & set(text):
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def dumps(cfg: Mapping[str, Any]) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _normalise_pattern(name: str, pattern: Any, kind_of: type) -> dict[str, Any]:
    """A rank or alpha pattern as a plain dict in its given order (the first matching key wins)."""
    if not isinstance(pattern, Mapping):
        raise PissaError(f"{name} must map module names (regular expressions) to numbers, got {pattern!r}")
    out = {}
    for key, value in pattern.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as e:
            raise PissaError(f"{name} key {key!r} is not a valid regular expression ({e})") from None
        allowed = int if kind_of is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed) or not value > 0:
            what = "a positive integer" if kind_of is int else "a positive number"
            raise PissaError(f"{name}[{key!r}] must be {what}, got {value!r}")
        out[str(key)] = kind_of(value)
    return out


def _pattern_value(pattern: Mapping[str, Any], module: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _normalise_options(kind, options: Any) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise PissaError(f"options must be a mapping of the kind's options, got {options!r}")
    unknown = sorted(set(options) - set(kind.OPTIONS))
    if unknown:
        have = f"its options are {', '.join(kind.OPTIONS)}" if kind.OPTIONS else "it has no options"
        raise PissaError(f"--kind {kind.NAME} takes no option {', '.join(unknown)}; {have}")
    out = {}
    for name, opt in kind.OPTIONS.items():
        value = options.get(name, opt.default)
        if value not in opt.choices:
            raise PissaError(f"unknown {name.replace('_', ' ')} {value!r}; choose {' or '.join(opt.choices)}")
        out[name] = value
    return out
