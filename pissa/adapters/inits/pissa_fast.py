"""PiSSA with a randomised SVD (Halko, Martinsson and Tropp; PEFT's pissa_niter_K): the top-r
singular pairs from a sketch with --niter power iterations and --oversampling extra columns. The
sketch is drawn from the core's generator, seeded by --seed and the matrix name, so every backend
gets the same one and the result is reproducible (PEFT's is not)."""

from __future__ import annotations

import numpy as np

from pissa.adapters.inits.pissa import principal
from pissa.numeric.decompose import sketch_matrix, svd_randomized

NAME = "pissa-fast"
HELP = "randomised SVD"
RESIDUAL = True
FULL_SVD = False
QPISSA = True
COST = 1.2e-10  # seconds per element, pass over W (2 niter + 2) and sketch column (see pissa.py's COST)
_PEFT_PREFIX = "pissa_niter_"


def peft(spec):
    return f"{_PEFT_PREFIX}{spec.niter}"


def from_peft(value):
    if isinstance(value, str) and value.startswith(_PEFT_PREFIX) and value[len(_PEFT_PREFIX):].isdigit():
        return {"init": NAME, "niter": int(value[len(_PEFT_PREFIX):])}
    return None


def factors(W, shape, names, spec, ops):
    k = min(spec.rank + spec.oversampling, *shape)
    omega = np.stack([sketch_matrix(shape[1], k, spec.seed, name) for name in names])
    U, S, Vt = svd_randomized(W, ops.asarray(omega, spec.compute_dtype), spec.niter, ops)
    return principal(U, S, Vt, spec, ops)


def cost(shape, spec) -> float:
    m, n = shape
    return COST * (2 * spec.niter + 2) * m * n * min(m, n, spec.rank + spec.oversampling)
