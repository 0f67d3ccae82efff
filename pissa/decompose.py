"""PiSSA's decomposition, written once over the Ops protocol (see pissa.ops).

For W [out, in], rank r and scale s:
    W = U diag(S) V^T                          (full SVD, or randomised with a seeded sketch)
    A = diag(sqrt(S_r / s)) V_r^T              [r, in]
    B = U_r diag(sqrt(S_r / s))                [out, r]
    W_res = W - s * B @ A                      from A and B as stored (rounded to the dtype)
so W_res + s * B @ A reproduces W as closely as the storage dtype allows.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pissa.formats.safetensors import np_dtype
from pissa.ops import Array, Ops
from pissa.spec import AdapterSpec


@dataclass
class Factors:
    """One target's result, as numpy arrays in the storage dtype.

    A [r, in], B [out, r], residual [out, in]; spectrum is the top-r singular values (float64)
    or None for the "lora" init.
    """

    A: np.ndarray
    B: np.ndarray
    residual: np.ndarray
    spectrum: np.ndarray | None


def generator(seed: int, name: str) -> np.random.Generator:
    """The numpy Generator for one matrix: depends on the seed and the matrix name only, so a
    matrix gets the same random numbers whatever the order or subset of matrices processed."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def sketch_matrix(n_in: int, k: int, seed: int, name: str) -> np.ndarray:
    """The randomised SVD's Gaussian test matrix Omega [in, k], float64, from the core's
    generator; every backend receives this same array."""
    return generator(seed, name).standard_normal((n_in, k))


def svd_full(W: Array, ops: Ops) -> tuple[Array, Array, Array]:
    """Thin SVD of W [m, n]: U [m, k], S [k], Vt [k, n]."""
    return ops.svd(W)


def svd_randomized(W: Array, omega: Array, niter: int, ops: Ops) -> tuple[Array, Array, Array]:
    """Randomised SVD (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1).

    Args:
        W: [m, n].
        omega: [n, k] test matrix, k = rank + oversampling, k <= min(m, n).
        niter: power iterations; each re-orthonormalises with QR, so small singular
            values are not lost to rounding.

    Returns:
        U [m, k], S [k], Vt [k, n]; the caller keeps the leading r.
    The only SVD is of a k x k matrix: the projected [k, n] matrix is factored by QR first,
    because MLX's svd always builds the full square factors.
    """
    t = ops.t
    Q = ops.qr(W @ omega)
    for _ in range(niter):
        Q = ops.qr(W @ ops.qr(t(W) @ Q))
    small = t(Q) @ W                     # [k, n] = R2^T Q2^T with small^T = Q2 R2
    Q2 = ops.qr(t(small))                # [n, k]
    R2t = small @ Q2                     # [k, k] = R2^T
    Ur, S, Vrt = ops.svd(R2t)
    return Q @ Ur, S, t(Q2 @ t(Vrt))


def canonicalize(U: Array, Vt: Array, ops: Ops) -> tuple[Array, Array]:
    """Flip each singular pair (U[:, i], Vt[i]) so that U[:, i]'s largest-magnitude entry is
    positive. SVD signs are arbitrary; after this, A and B (not just B @ A) agree across
    backends and libraries. U @ diag(S) @ Vt is unchanged."""
    signs = ops.column_signs(U)
    return U * signs[..., None, :], Vt * signs[..., :, None]


def split(U: Array, S: Array, Vt: Array, scale: float, ops: Ops) -> tuple[Array, Array]:
    """A = sqrt(S / s) Vt [r, in], B = U sqrt(S / s) [out, r], so s * B @ A = U diag(S) Vt."""
    root = ops.sqrt(S / scale)
    return Vt * root[..., :, None], U * root[..., None, :]


def residual(W: Array, A: Array, B: Array, scale: float) -> Array:
    """W - s * B @ A, in W's dtype."""
    return W - (B @ A) * scale


def decompose(W: np.ndarray, name: str, spec: AdapterSpec, ops: Ops) -> Factors:
    """PiSSA (or LoRA) init of one weight.

    Args:
        W: [out, in] float array on the host (float32 from the loaders).
        name: the module path; it seeds this matrix's random numbers.
        spec: rank, scale, init method, niter, oversampling, seed, dtypes.
        ops: the backend doing the arithmetic.

    Returns:
        Factors in spec.dtype. The residual is computed from A and B after rounding them to
        spec.dtype, in spec.compute_dtype, then rounded itself.

    Raises:
        ValueError: if W is not 2-D or the rank exceeds min(out, in).
    """
    return decompose_many([W], [name], spec, ops)[0]


def decompose_many(Ws: Sequence[np.ndarray], names: Sequence[str], spec: AdapterSpec, ops: Ops) -> list[Factors]:
    """decompose() for several weights of one shape, stacked into one batch [b, out, in] so
    that backends with batched SVDs (GPUs) factor them in one call. Same results as one by one.
    """
    shape = Ws[0].shape
    if any(W.shape != shape for W in Ws) or len(shape) != 2 or spec.rank > min(shape):
        raise ValueError(f"{names[0]}: rank {spec.rank} does not fit weights of shape {[W.shape for W in Ws]}")
    out_dtype = np_dtype(spec.dtype)
    r = spec.rank
    if spec.init == "lora":
        return [_lora(W, name, spec, out_dtype) for W, name in zip(Ws, names)]

    # A backend may need the arithmetic in a scope (MLX: float64 only on a CPU stream).
    with ops.scope(spec.compute_dtype):
        Wd = ops.asarray(np.stack(Ws), spec.compute_dtype)
        if spec.init == "pissa":
            U, S, Vt = svd_full(Wd, ops)
        else:
            k = min(r + spec.oversampling, *shape)
            omega = np.stack([sketch_matrix(shape[1], k, spec.seed, name) for name in names])
            U, S, Vt = svd_randomized(Wd, ops.asarray(omega, spec.compute_dtype), spec.niter, ops)
        U, S, Vt = U[..., :r], S[..., :r], Vt[..., :r, :]
        U, Vt = canonicalize(U, Vt, ops)
        A, B = split(U, S, Vt, spec.scale, ops)
        A, B = ops.round_to(A, spec.dtype), ops.round_to(B, spec.dtype)
        R = ops.round_to(residual(Wd, A, B, spec.scale), spec.dtype)
        A, B, R, S = (ops.to_numpy(x) for x in (A, B, R, S))
    return [Factors(A=_stored(A[i], out_dtype), B=_stored(B[i], out_dtype), residual=_stored(R[i], out_dtype),
                    spectrum=S[i].astype(np.float64)) for i in range(len(Ws))]


def _stored(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # The values are already representable in dtype (round_to went through float32), so this
    # cast is exact and identical on every backend.
    return x.astype(np.float32).astype(dtype)


def _lora(W: np.ndarray, name: str, spec: AdapterSpec, dtype: np.dtype) -> Factors:
    # LoRA's own init (PEFT's default): A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    # B = 0, so W_res = W. Drawn from the core's generator, hence the same on every backend.
    bound = 1.0 / math.sqrt(W.shape[1])
    A = generator(spec.seed, name).uniform(-bound, bound, (spec.rank, W.shape[1]))
    return Factors(A=_stored(A, dtype), B=np.zeros((W.shape[0], spec.rank), dtype),
                   residual=W.astype(np.float32).astype(dtype), spectrum=None)
