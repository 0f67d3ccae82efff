"""An adapter in memory (module path -> its kind's parameters as numpy arrays), its fingerprint,
and the checks of an adapter against a model's target weights. Files are pissa.files.formats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from pissa.errors import PissaError

if TYPE_CHECKING:  # the spec imports the kinds, which import this module
    from pissa.adapters.spec import AdapterSpec

# pissa_config.json fields that describe the base model rather than the adapter: every adapter
# derived from an init (trained, converted) carries them on (pissa.files.layouts writes them).
BASE_MODEL_INFO = ("fan_in_fan_out", "model_type")


@dataclass
class Adapter:
    """An adapter in memory: module path -> the kind's parameters as numpy arrays, in the order of
    the kind's TENSORS: (A [r, in], B [out, r]) for the LoRA-shaped kind, (M [r_hat, r_hat],) for
    MoRA, and so on (pissa.adapters.kinds).

    info holds pissa_config.json's extra fields (e.g. "role": "pissa_init" | "trained" |
    "lora", and "fingerprint" of the initial adapter).
    """

    spec: AdapterSpec
    factors: dict[str, tuple[np.ndarray, ...]]
    base_model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def fingerprint(factors: Mapping[str, tuple[np.ndarray, ...]]) -> str:
    """A short hash of an initial adapter, stored with it, so that conversion can tell whether
    a trained adapter started from this init."""
    h = hashlib.sha256()
    for module in sorted(factors):
        for x in factors[module]:
            h.update(module.encode())
            h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def init_fingerprint(init: Adapter) -> str:
    """The fingerprint of a pissa_init: the one pissa init stored in pissa_config.json, or, for an
    init that PEFT or the official PiSSA scripts wrote (no pissa_config.json), the same hash
    computed from its factors as stored."""
    return init.info.get("fingerprint") or fingerprint(init.factors)


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
        want = kind.shapes(adapter.spec.for_module(m), tuple(shapes[m]))
        if tuple(tuple(p.shape) for p in params) != tuple(want):
            have = " / ".join(f"{t.removeprefix('lora_')} {tuple(p.shape)}" for t, p in zip(kind.TENSORS, params))
            problems.append(f"{m}: {have} do not fit weight {tuple(shapes[m])}")
    return problems


@dataclass
class Start:
    """One weight's initial adapter, as a kind's init() returns it: its parameters (storage dtype,
    in the kind's TENSORS order), the base weight to store [out, in] (the residual for PiSSA, the
    weight itself otherwise), and the singular values kept when an SVD ran."""

    params: tuple[np.ndarray, ...]
    base: np.ndarray
    spectrum: np.ndarray | None = None
