"""PissaLinear, the LoRA-shaped kind ("lora"): the base holds W_res (or W, for LoRA's own init)
and the trainable factors are A [r, in] and B [out, r]: y = x W_res^T + s * (dropout(x) A^T) B^T.
Every LoRA-shaped init (PiSSA, LoRA, OLoRA, MiLoRA) trains this layer.

QPiSSA: the base may be an nn.QuantizedLinear holding Q(W_res), as mlx-lm loads the residual
model that `pissa init --quantize affine4|int8` writes; y = deq(Q(W_res)) x + s B A x, the base
frozen and only A and B trained (see pissa_mlx.layers.base)."""

from __future__ import annotations

from pissa_mlx.layers.base import AdapterLinear, weight_shape

import mlx.core as mx
from mlx import nn


class PissaLinear(AdapterLinear):
    KIND = "lora"
    PARAMS = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear | nn.QuantizedLinear, A: mx.array, B: mx.array, scale: float,
                 dropout: float = 0.0):
        out_features, in_features = weight_shape(base)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_features or B.shape != (out_features, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{(out_features, in_features)}")
        super().__init__(base, dropout)
        self.lora_A = A
        self.lora_B = B
        self.scale = float(scale)

    @classmethod
    def from_params(cls, base: nn.Linear | nn.QuantizedLinear, params: tuple[mx.array, ...], spec) -> "PissaLinear":
        """Wrap `base`, whose weight must already be the residual W_res (or, for an
        nn.QuantizedLinear, its quantisation Q(W_res) from QPiSSA), with the kind's parameters
        (A, B), the spec's scale and dropout. Raises ValueError when A [r, in] and B [out, r] do
        not fit the weight [out, in]."""
        A, B = params
        return cls(base, A, B, spec.scale, spec.dropout)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> mx.array:
        """s * B @ A, [out, in], in the base weight's (float) dtype."""
        return ((self.lora_B * self.scale) @ self.lora_A).astype(self._dtype())

    def update(self, x: mx.array) -> mx.array:
        """s * x A^T B^T, in x's dtype."""
        return ((x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)) * self.scale

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}, quantized={self.quantized}"


LAYER = PissaLinear
