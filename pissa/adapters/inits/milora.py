"""MiLoRA (arXiv 2406.09044): PiSSA's split with the r minor singular components of W, the last r
of min(out, in), instead of the principal ones; the principal part stays frozen in the residual.
Its authors keep the pretrained knowledge (the principal part) out of the update, and attribute
PiSSA's learning-rate sensitivity to the large early gradient of the principal components.

Not in PEFT (PEFT's MiCA, also built from the minor vectors, freezes B and trains only A: another
method), so the files say init_lora_weights true: they hold the initialised weights anyway.
"""

from __future__ import annotations

from pissa.adapters.inits.pissa import cost as full_svd_cost
from pissa.numeric.decompose import canonicalize, split, svd_full

NAME = "milora"
HELP = "MiLoRA: full SVD, the r minor components"
RESIDUAL = True
FULL_SVD = True
QPISSA = False  # QPiSSA quantises a residual freed of the principal part; MiLoRA's keeps it


def peft(spec):
    return True


def from_peft(value):
    return None  # PEFT has no MiLoRA; pissa_config.json's spec says init "milora"


def factors(W, shape, names, spec, ops):
    U, S, Vt = svd_full(W, ops)
    return minor(U, S, Vt, spec, ops)


def minor(U, S, Vt, spec, ops):
    """The last r singular pairs as (A, B, S), S still descending, signs canonical."""
    k = S.shape[-1]
    lo = k - spec.rank
    U, S, Vt = U[..., lo:], S[..., lo:], Vt[..., lo:, :]
    U, Vt = canonicalize(U, Vt, ops)
    A, B = split(U, S, Vt, spec.scale, ops)
    return A, B, S


def cost(shape, spec) -> float:
    return full_svd_cost(shape, spec)  # the same full SVD as PiSSA's
