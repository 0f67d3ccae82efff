"""The LoRA-shaped kind: A [r, in] and B [out, r], dW = s * B @ A. PiSSA, its randomised variant,
LoRA's own init, OLoRA and MiLoRA all train this pair; they differ only in how it starts
(pissa.adapters.inits).

Conversion (the PiSSA paper's identity): training moves (A0, B0) to (A', B'), so the model is
W_res + s B'A' = W + s (B'A' - B0A0) = W + s [B' | -B0] @ [A' ; A0]: a plain rank-2r LoRA on
the ORIGINAL weights W, with the same scale s (alpha -> 2 alpha; rsLoRA alpha -> sqrt(2) alpha).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np

from pissa.adapters import inits
from pissa.adapters.adapter import BASE_MODEL_INFO, Start, init_fingerprint
from pissa.errors import PissaError

NAME = "lora"
HELP = "PEFT's A and B; the default"
LORA_SHAPED = True
OPTIONS: dict = {}
TENSORS = ("lora_A", "lora_B")
KEY_SUFFIX: dict[str, str] = {}
MLX_LM = ("lora", {"lora_A": "lora_a", "lora_B": "lora_b"})  # fine_tune_type, our tensor -> mlx-lm's name
RECORDS_SHAPES = False  # pissa_config.json "shapes": [out, in] of each module
EMPTY_INIT = False
RANKED = True   # its shapes follow --rank
OUTPUT = "adapter"


class QuantizedBaseWarning(UserWarning):
    """The converted LoRA of a QPiSSA run is exact only on the unquantised base model."""


def check(spec) -> None:
    """Nothing beyond AdapterSpec's own checks."""


def scale(spec) -> float:
    return spec.alpha / (math.sqrt(spec.rank) if spec.use_rslora else spec.rank)


def changes_base(spec) -> bool:
    """Whether the init takes its product out of the base weight (PiSSA's residual)."""
    return inits.get(spec.init).RESIDUAL


def shapes(spec, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    out, n_in = shape
    return (spec.rank, n_in), (out, spec.rank)


def misfit(spec, shape: tuple[int, int]) -> str | None:
    if spec.rank > min(shape):
        return f"rank {spec.rank} exceeds min(out, in) = {min(shape)}"
    return None


def inconsistent(spec, params: tuple[np.ndarray, ...]) -> str | None:
    A, B = params
    if not (A.ndim == B.ndim == 2 and A.shape[0] == B.shape[1] == spec.rank):
        return f"A {A.shape} and B {B.shape} do not fit rank {spec.rank}"
    return None


def init(Ws: Sequence[np.ndarray], names: Sequence[str], spec, ops) -> list[Start]:
    return [Start((f.A, f.B), f.residual, f.spectrum) for f in inits.decompose_many(Ws, names, spec, ops)]


def init_quantized(W: np.ndarray, name: str, spec, ops, scheme, iters: int):
    """QPiSSA (pissa.numeric.qpissa): the init repeated on W - deq(Q(W_res)); a QFactors."""
    return inits.decompose_quantized(W, name, spec, ops, scheme, iters)


def delta(spec, params: tuple[np.ndarray, ...], shape: tuple[int, int], dtype=np.float64) -> np.ndarray:
    """s * B @ A [out, in], computed in `dtype` (float64: the oracle; merge uses float32)."""
    A, B = params
    return (B.astype(dtype) @ A.astype(dtype)) * dtype(scale(spec))


def merged(spec, params: tuple[np.ndarray, ...], W: np.ndarray) -> np.ndarray:
    """W + dW, in float64 for a float64 W (the oracle), else in float32 (what `pissa merge` has
    always computed)."""
    dtype = np.float64 if W.dtype == np.float64 else np.float32
    return W.astype(dtype) + delta(spec, params, W.shape, dtype)


def peft_fields(spec) -> dict[str, Any]:
    return {}


PEFT_KEYS: tuple[str, ...] = ()


def from_peft(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Spec fields for a PEFT config of this kind, or None when the config is not this kind."""
    return None


def quantized_base_note(initial) -> str | None:
    """The caveat for a LoRA converted from a QPiSSA init, or None for a plain PiSSA init."""
    q = initial.info.get("quantization")
    if not q:
        return None
    return (f"this adapter was trained on a {q.get('scheme')}-quantised residual (QPiSSA); the converted LoRA "
            "reproduces the trained model exactly only on the unquantised original base, and on a quantised base "
            "it carries that base's quantisation error (PEFT says the same of its conversions)")


# Below this median similarity (see similarity()) a trained adapter without a fingerprint is refused.
# Measured on a tiny Llama at rank 4: runs from the same init kept a median of 0.9999 after 40 steps
# at lr 1e-4, and 0.87 (lowest module 0.71) at lr 1e-2, 100x the default; adapters trained from
# another init (another model, or LoRA's init against PiSSA's) gave |median| < 0.05.
MIN_SIMILARITY = 0.5


def similarity(initial: tuple[np.ndarray, ...], trained: tuple[np.ndarray, ...]) -> float:
    """How much a trained (A', B') still points where the initial (A0, B0) did: the cosine of
    B'A' and B0A0 (Frobenius inner product, so it ignores the signs of singular pairs, which PEFT
    does not canonicalise), or of A' and A0 when B0 = 0 (LoRA's init, where training moves A
    slowly). Computed from r x r products, never the [out, in] matrices."""
    A0, B0, A1, B1 = (x.astype(np.float64) for x in (*initial, *trained))

    def inner(A, B, C, D):  # <B A, D C>_F = sum((B^T D) * (A C^T))
        return float(np.sum((B.T @ D) * (A @ C.T)))

    n0, n1 = inner(A0, B0, A0, B0), inner(A1, B1, A1, B1)
    if n0 == 0.0:
        A0, A1 = A0.ravel(), A1.ravel()
        denom = float(np.linalg.norm(A0) * np.linalg.norm(A1))
        return float(A0 @ A1) / denom if denom else 0.0
    return inner(A0, B0, A1, B1) / np.sqrt(n0 * n1) if n1 else 0.0


def converts(spec) -> bool:
    return True


def to_lora(initial, trained):
    """The rank-2r LoRA that turns the original model into the trained PiSSA model.

    Args:
        initial: the adapter pissa init wrote (DIR/pissa_init); required.
        trained: the same adapter after training.

    Raises:
        PissaError: when `initial` is missing or `trained` did not start from it: a different
            fingerprint, modules, ranks, scales or shapes, or, for a trained adapter without a
            fingerprint (PEFT's), factors that no longer point where the initial ones did.

    Warns:
        QuantizedBaseWarning: when `initial` is a QPiSSA init (see quantized_base_note).
    """
    if initial is None:
        raise PissaError("converting a PiSSA or LoRA adapter needs --initial MODEL_DIR/pissa_init, the init it "
                         "was trained from")
    start = trained.info.get("init_fingerprint")
    # An init written by PEFT or the official PiSSA scripts has no pissa_config.json, so no role.
    if initial.info.get("role", "pissa_init") != "pissa_init":
        raise PissaError(f"--initial is a {initial.info['role']} adapter; pass the pissa_init folder of the model "
                         "that was trained")
    # An init without pissa_config.json gets the fingerprint pissa.training.run gives it: its factors' hash.
    init_fp = init_fingerprint(initial)
    if start is not None and start != init_fp:
        raise PissaError("the trained adapter started from a different init than --initial "
                         f"(fingerprint {start} vs {init_fp}); pass the pissa_init folder of the model it was "
                         "trained on")
    if set(initial.factors) != set(trained.factors):
        raise PissaError(f"--initial and --trained adapt different modules "
                         f"({len(initial.factors)} vs {len(trained.factors)}); they are not the same run")
    si, st = initial.spec, trained.spec
    differs = next((m for m in initial.factors if (si.for_module(m).rank, si.for_module(m).scale)
                    != (st.for_module(m).rank, st.for_module(m).scale)), None)
    if si.kind != st.kind or differs is not None:
        m = differs or next(iter(initial.factors))
        raise PissaError(f"--initial has rank {si.for_module(m).rank} and scale {si.for_module(m).scale:g} but "
                         f"--trained has rank {st.for_module(m).rank} and scale {st.for_module(m).scale:g} (at {m}); "
                         "they are not the same run")
    shapes = [f"{m}: A {A0.shape} / B {B0.shape} vs A {trained.factors[m][0].shape} / B {trained.factors[m][1].shape}"
              for m, (A0, B0) in initial.factors.items()
              if (A0.shape, B0.shape) != tuple(p.shape for p in trained.factors[m])]
    if shapes:
        raise PissaError(f"--initial and --trained have other shapes in {len(shapes)} module(s), so they are not "
                         f"the same model: " + "; ".join(shapes))
    if start is None:  # no fingerprint (e.g. trained with PEFT): compare the factors themselves
        median = float(np.median([similarity(initial.factors[m], trained.factors[m]) for m in initial.factors]))
        if median < MIN_SIMILARITY:
            raise PissaError(f"the trained adapter does not look trained from --initial (median similarity "
                             f"{median:.2f} < {MIN_SIMILARITY}: its s*B'A' points elsewhere than the init's s*B0*A0); "
                             "pass the pissa_init folder of the model it was trained on")
    note = quantized_base_note(initial)
    if note:
        warnings.warn(note, QuantizedBaseWarning, stacklevel=3)
    factors = {}
    for m, (A0, B0) in initial.factors.items():
        A1, B1 = trained.factors[m]
        dtype = A1.dtype
        A = np.concatenate([A1.astype(np.float32), A0.astype(np.float32)], axis=0)    # [2r, in]
        B = np.concatenate([B1.astype(np.float32), -B0.astype(np.float32)], axis=1)   # [out, 2r]
        factors[m] = (A.astype(dtype), B.astype(dtype))
    double = math.sqrt(2) if st.use_rslora else 2  # alpha over 2r (or sqrt(2r)): the same scale
    spec = dataclasses.replace(st, rank=2 * st.rank, alpha=st.alpha * double, kind=NAME, init="lora",
                               rank_pattern={k: 2 * r for k, r in st.rank_pattern.items()},
                               alpha_pattern={k: a * double for k, a in st.alpha_pattern.items()})
    if not all(math.isclose(spec.for_module(m).scale, st.for_module(m).scale, rel_tol=1e-12) for m in factors):
        raise AssertionError("conversion must keep the scale")
    return type(trained)(spec, factors, base_model=initial.info.get("source"),
                         info={"role": "lora", "converted_from": trained.info.get("init_fingerprint"),
                      **{k: trained.info[k] for k in BASE_MODEL_INFO if k in trained.info}})
