"""PiSSA (arXiv 2404.02948): the adapter takes the top-r singular values and vectors of W, from a
full SVD; the rest stays frozen in the residual."""

from __future__ import annotations

from pissa.numeric.decompose import canonicalize, split, svd_full

NAME = "pissa"
HELP = "full SVD; the default"
RESIDUAL = True
FULL_SVD = True
QPISSA = True
# Seconds on one core of the project's 2-core machine, fitted to scripts/bench_svd_shapes.py's
# per-shape timings (docs/scaling.md): the SVD and the residual cost a m n k + b k^3, k = min(m, n).
COST = (3.0e-10, 1.8e-10)


def peft(spec):
    return "pissa"


def from_peft(value):
    return {"init": NAME} if value == "pissa" else None


def factors(W, shape, names, spec, ops):
    U, S, Vt = svd_full(W, ops)
    return principal(U, S, Vt, spec, ops)


def principal(U, S, Vt, spec, ops):
    """The top-r singular pairs as (A, B, S), their signs canonical (pissa.numeric.decompose)."""
    r = spec.rank
    U, S, Vt = U[..., :r], S[..., :r], Vt[..., :r, :]
    U, Vt = canonicalize(U, Vt, ops)
    A, B = split(U, S, Vt, spec.scale, ops)
    return A, B, S


def cost(shape, spec) -> float:
    m, n = shape
    k = min(m, n)
    return COST[0] * m * n * k + COST[1] * k ** 3
