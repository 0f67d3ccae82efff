"""PissaLinear: an mlx.nn.Linear holding W_res, plus the trainable factors A [r, in] and B [out, r].

y = x W_res^T + s * (dropout(x) A^T) B^T, the orientation used everywhere in pissa (PEFT's, not
mlx-lm's [in, r] / [r, out]; pissa.formats.mlx_lm converts at the file boundary). It wraps and
unwraps itself in the mlx-lm style: PissaLinear.from_base(linear, A, B, scale) and
layer.fuse() -> nn.Linear.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from pissa.errors import PissaError

QUANTIZED_BASE = ("quantised base layer {name}: PiSSA needs the full-precision weight to decompose; "
                  "run pissa init on the unquantised model")


class PissaLinear(nn.Module):
    def __init__(self, base: nn.Linear, A: mx.array, B: mx.array, scale: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.QuantizedLinear):
            raise PissaError(QUANTIZED_BASE.format(name=type(base).__name__))
        out_features, in_features = base.weight.shape
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_features or B.shape != (out_features, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{tuple(base.weight.shape)}")
        self.base = base
        self.lora_A = A
        self.lora_B = B
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        self.base.freeze()

    @classmethod
    def from_base(cls, base: nn.Linear, A: mx.array, B: mx.array, scale: float,
                  dropout: float = 0.0) -> "PissaLinear":
        """Wrap `base`, whose weight must already be the residual W_res.

        Raises:
            PissaError: for an nn.QuantizedLinear base (PiSSA decomposes unquantised weights).
            ValueError: when A [r, in] and B [out, r] do not fit the weight [out, in].
        """
        return cls(base, A, B, scale, dropout)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> mx.array:
        """s * B @ A, [out, in], in the base weight's dtype."""
        return ((self.lora_B * self.scale) @ self.lora_A).astype(self.base.weight.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.merged:
            return y
        if self.dropout is not None:
            x = self.dropout(x)
        z = (x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        return y + (z * self.scale).astype(y.dtype)

    def merge(self) -> None:
        """Add s*B@A into the base weight; the forward then skips the adapter. unmerge() undoes it."""
        if not self.merged:
            self.base.weight = self.base.weight + self.delta()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base.weight = self.base.weight - self.delta()
            self.merged = False

    def fuse(self) -> nn.Linear:
        """A plain nn.Linear computing W_res + s*B@A (this layer is left unchanged)."""
        out_features, in_features = self.base.weight.shape
        has_bias = "bias" in self.base
        fused = nn.Linear(in_features, out_features, bias=has_bias)
        fused.weight = self.base.weight if self.merged else self.base.weight + self.delta()
        if has_bias:
            fused.bias = self.base.bias
        return fused

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"
