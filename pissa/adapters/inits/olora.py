"""OLoRA (arXiv 2406.01775; PEFT's init_lora_weights="olora"): the adapter starts from the QR of W
[out, in] = Q R, B = Q[:, :r] [out, r] and A = R[:r] [r, in], and the residual is W - s B A.
Unlike PiSSA, the factors are not divided by the scale s: s B A = s Q_r R_r, not Q_r R_r.

PEFT keeps the signs LAPACK's Householder QR gives (each column of Q may flip with the matching row
of R, and GPU solvers choose differently). We canonicalise them with PiSSA's rule (each column of B
has its largest-magnitude entry positive, pissa.numeric.decompose.canonicalize), so that A and B
themselves agree across backends; B A and the residual do not change."""

from __future__ import annotations

from pissa.numeric.decompose import canonicalize

NAME = "olora"
HELP = "OLoRA: QR of W"
RESIDUAL = True
FULL_SVD = False
QPISSA = False
# Seconds on one core of the project's 2-core machine, in the units of pissa.py's COST (only the
# ratio to it matters to pissa.jobs.init_ranks): t = a m n k + b k^3, k = min(m, n). Measured:
# pissa init's whole decomposition (numpy float64, r=16, OMP_NUM_THREADS=1, best of 3, two runs
# averaged), OLoRA against PiSSA's full SVD:
#   576x576 0.039 / 0.102 s, 1536x576 0.117 / 0.240 s, 576x1536 0.076 / 0.246 s,
#   1024x1024 0.177 / 0.619 s, 1024x3072 0.555 / 1.72 s, 3072x1024 0.740 / 1.47 s,
#   2048x2048 1.39 / 5.47 s (4096x4096: OLoRA 10.3 s).
# The QR (LAPACK geqrf + orgqr) is nearly all of it, and is slower on tall W (ratio 0.5) than on
# wide (0.3). Fitted to ratio x pissa.py's model: worst error 26%.
COST = (1.3e-10, 0.9e-11)


def peft(spec):
    return "olora"


def from_peft(value):
    return {"init": NAME} if value == "olora" else None


def factors(W, shape, names, spec, ops):
    r = spec.rank
    Q = ops.qr(W)[..., :r]          # [b, out, r]: the reduced Q is [out, min(out, in)], wide W too
    R = ops.t(Q) @ W                # [b, r, in] = R[:r] of W = Q R, in the compute dtype
    B, A = canonicalize(Q, R, ops)
    return A, B, None


def cost(shape, spec) -> float:
    m, n = shape
    k = min(m, n)
    return COST[0] * m * n * k + COST[1] * k ** 3
