"""The decompositions the inits are made of, written once over the Ops protocol (pissa.numeric.ops).

For W [out, in], rank r and scale s, PiSSA's split is
    W = U diag(S) V^T                          (full SVD, or randomised with a seeded sketch)
    A = diag(sqrt(S_r / s)) V_r^T              [r, in]
    B = U_r diag(sqrt(S_r / s))                [out, r]
    W_res = W - s * B @ A                      from A and B as stored (rounded to the dtype)
so W_res + s * B @ A reproduces W as closely as the storage dtype allows. Which singular pairs go
into the adapter, and how A and B are rounded and stored, is the init's (pissa.adapters.inits);
these functions are the arithmetic, on arrays with optional leading batch axes.
"""

from __future__ import annotations

import zlib

import numpy as np

from pissa.numeric.ops import Array, Ops


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


def stored(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x (values already representable in dtype, as round_to leaves them) cast to dtype through
    float32: exact, and identical on every backend."""
    return x.astype(np.float32).astype(dtype)
