"""How a LoRA-shaped adapter starts (`pissa init --init`): one module per init, each an entry in a
registry that finds every module of this package, so adding an init is adding one file here.

Every init module exposes the same names (as the kinds do, pissa.adapters.kinds):

    NAME        the --init name ("pissa", "pissa-fast", "lora", ...); HELP, a few words for --help
    RESIDUAL    whether the init takes its product out of the base weight (W_res = W - s B A: the
                model is unchanged at step 0) or leaves the base alone (B = 0, LoRA's own init)
    FULL_SVD    whether it needs a full SVD (its cost grows like m n min(m, n); a randomised SVD's or
                a QR's does not need one)
    QPISSA      whether it can run under QPiSSA (`--quantize`): the init is repeated on
                W - deq(Q(W_res)), which only makes sense when the adapter takes the principal part
    peft(spec)              PEFT's init_lora_weights for it before the adapter exists ("pissa",
                            "pissa_niter_4", "olora", true where PEFT has no such init); the files
                            pissa writes say true, since they hold the initialised weights
    from_peft(value)        the spec fields a PEFT init_lora_weights value means, or None when the
                            value is not this init's
    factors(W, shape, names, spec, ops)
                            (A [b, r, in], B [b, out, r], S [b, r] or None) for b stacked weights
                            W [b, out, in] of `shape` (an ops array in spec.compute_dtype; None when
                            RESIDUAL is False), before rounding; S are the singular values kept
    cost(shape, spec)       estimated seconds for one weight of `shape` [out, in] on one core of the
                            project's machine: how pissa.jobs.init_ranks weighs the work

What every init shares lives here: rounding A and B to the storage dtype, the residual computed
from the factors as stored (decompose_many), and the QPiSSA iteration around an init
(decompose_quantized). The float64 oracle of an init is the same code on NumpyOps at float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pissa.adapters.registry import Registry
from pissa.errors import PissaError
from pissa.numeric.decompose import residual, stored
from pissa.numeric.dtypes import as_dtype, np_dtype
from pissa.numeric.ops import Ops
from pissa.numeric.qpissa import QFactors, iterate
from pissa.numeric.quant import QuantScheme


# How help texts list them; others follow.
_REGISTRY = Registry(__name__, __path__, ("pissa", "pissa-fast", "lora", "olora", "milora"), "init")
names, get = _REGISTRY.names, _REGISTRY.get


def from_peft(value) -> dict:
    """The spec fields of a PEFT init_lora_weights value.

    Raises:
        PissaError: for a value no init of pissa reads.
    """
    for module in _REGISTRY.entries.values():
        fields = module.from_peft(value)
        if fields is not None:
            return fields
    readable = ", ".join(repr(v) for v in (True, "pissa", "pissa_niter_K", "olora"))
    raise PissaError(f"init_lora_weights {value!r} is not supported; pissa reads {readable}")


@dataclass
class Factors:
    """One target's init, as numpy arrays in the storage dtype: A [r, in], B [out, r], the base
    weight to store [out, in] (the residual W - s B A, or W itself when the init leaves it), and
    the singular values kept (float64), or None for an init without an SVD."""

    A: np.ndarray
    B: np.ndarray
    residual: np.ndarray
    spectrum: np.ndarray | None


def decompose(W: np.ndarray, name: str, spec, ops: Ops) -> Factors:
    """The init `spec.init` of one weight W [out, in] (float on the host); see decompose_many."""
    return decompose_many([W], [name], spec, ops)[0]


def decompose_many(Ws: Sequence[np.ndarray], names: Sequence[str], spec, ops: Ops) -> list[Factors]:
    """The init of several weights of one shape, stacked into one batch [b, out, in] so that
    backends with batched SVDs (GPUs) factor them in one call; the same results as one by one.

    A and B are rounded to spec.dtype first, and the residual is computed from them as stored, in
    spec.compute_dtype, then rounded itself: W_res + s B A reproduces W as closely as the dtype allows.

    Raises:
        ValueError: for weights of different shapes, not 2-D, or smaller than the rank.
    """
    shape = Ws[0].shape
    if any(W.shape != shape for W in Ws) or len(shape) != 2 or spec.rank > min(shape):
        raise ValueError(f"{names[0]}: rank {spec.rank} does not fit weights of shape {[W.shape for W in Ws]}")
    method = get(spec.init)
    out_dtype = np_dtype(spec.dtype)
    # A backend may need the arithmetic in a scope (MLX: float64 only on a CPU stream).
    with ops.scope(spec.compute_dtype):
        Wd = ops.asarray(np.stack(Ws), spec.compute_dtype) if method.RESIDUAL else None
        A, B, S = method.factors(Wd, shape, names, spec, ops)
        A, B = ops.round_to(A, spec.dtype), ops.round_to(B, spec.dtype)
        R = ops.to_numpy(ops.round_to(residual(Wd, A, B, spec.scale), spec.dtype)) if method.RESIDUAL else None
        A, B = ops.to_numpy(A), ops.to_numpy(B)
        S = ops.to_numpy(S) if S is not None else None
    return [Factors(A=stored(A[i], out_dtype), B=stored(B[i], out_dtype),
                    residual=stored(R[i], out_dtype) if R is not None else as_dtype(Ws[i], out_dtype),
                    spectrum=S[i].astype(np.float64) if S is not None else None) for i in range(len(Ws))]


def decompose_quantized(W: np.ndarray, name: str, spec, ops: Ops, s: QuantScheme, iters: int) -> QFactors:
    """QPiSSA init of one weight W [out, in]: the init `spec.init` repeated `iters` times on
    W - deq(Q(W_res)) (pissa.numeric.qpissa).

    Raises:
        ValueError: for a non-2-D W or a rank larger than min(out, in).
        PissaError: for an init that cannot run under QPiSSA.
    """
    if W.ndim != 2 or spec.rank > min(W.shape):
        raise ValueError(f"{name}: rank {spec.rank} does not fit a weight of shape {W.shape}")
    method = get(spec.init)
    if not method.QPISSA:
        able = ", ".join(n for n, m in _REGISTRY.entries.items() if m.QPISSA)
        raise PissaError(f"--quantize needs an init that takes the principal part ({able}), not {spec.init}")

    def factor(R):
        A, B, _ = method.factors(R[None], W.shape, [name], spec, ops)
        return ops.round_to(A[0], spec.dtype), ops.round_to(B[0], spec.dtype)

    return iterate(W, factor, spec.scale, spec.dtype, spec.compute_dtype, ops, s, iters)
