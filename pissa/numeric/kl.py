"""The per-token measures of a model's next-token distribution, written once over the Ops
protocol so that both backends compute them the same way on their own arrays (the logits of a
batch are too large to copy to the host): the log-likelihood of the labels, and the KL divergence
KL(p_reference || p_model) that `pissa compare` and the step-0 KL measure forgetting by.

The KL is not taken as a difference of two log-softmaxes: each carries the float32 rounding of its
normaliser (~1e-6 at a 49k vocabulary), as large as a small KL itself. With d = z_ref - z, shifted
to p-mean zero (the KL ignores a shift of d, and this one makes sum_v p_v e^(d_v) >= 1),
    KL = sum_v q_v d_v - log(sum_v p_v e^(d_v)),   q = softmax(z + d),
in its log1p/expm1 form. Where some d exceeds EXP_SAFE, e^d would overflow float32 and the KL is
large anyway: there it is the plain difference of log-softmaxes.
"""

from __future__ import annotations

import numpy as np

from pissa.numeric.ops import Array, Ops

EXP_SAFE = 30.0


def label_logprobs(z: Array, targets: np.ndarray, ops: Ops) -> np.ndarray:
    """log softmax(z)[target] per position, float32 numpy [..]: z [.., vocab] float32 logits,
    targets [..] int (any valid id where a position has no label)."""
    return ops.to_numpy(ops.take_last(ops.log_softmax(z), targets))


def kl_per_position(z_ref: Array, z: Array, ops: Ops) -> np.ndarray:
    """KL(softmax(z_ref) || softmax(z)) per position, float32 numpy [..], for logits [.., vocab]."""
    logp = ops.log_softmax(z)
    d = z_ref - z
    logq = ops.log_softmax(z + d)
    q, p = ops.exp(logq), ops.exp(logp)
    d = d - ops.sum_last(p * d, keepdims=True)
    small = ops.sum_last(q * d) - ops.log1p(ops.sum_last(p * ops.expm1(ops.minimum(d, EXP_SAFE))))
    large = ops.sum_last(q * (logq - logp))
    return ops.to_numpy(ops.where(ops.max_last(d) <= EXP_SAFE, small, large))
