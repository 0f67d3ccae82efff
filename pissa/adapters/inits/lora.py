"""LoRA's own init (PEFT's default, the baseline): A ~ kaiming_uniform(a=sqrt(5)), which is
U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so the base weight stays as it is. A is drawn from the
core's generator (seeded by --seed and the matrix name), hence the same on every backend."""

from __future__ import annotations

import math

import numpy as np

from pissa.numeric.decompose import generator

NAME = "lora"
HELP = "LoRA's own: random A, B = 0"
RESIDUAL = False
FULL_SVD = False
QPISSA = False


def peft(spec):
    return True


def from_peft(value):
    # "gaussian" draws A otherwise; trained and converted adapters say true whatever they started from.
    return {"init": NAME} if value is True or value == "gaussian" else None


def factors(W, shape, names, spec, ops):
    out, n_in = shape
    bound = 1.0 / math.sqrt(n_in)
    A = np.stack([generator(spec.seed, name).uniform(-bound, bound, (spec.rank, n_in)) for name in names])
    B = np.zeros((len(names), out, spec.rank))
    return ops.asarray(A, spec.compute_dtype), ops.asarray(B, spec.compute_dtype), None


def cost(shape, spec) -> float:
    return 0.0
