"""DoraLinear, DoRA ("dora"; the math and its float64 oracle: pissa.adapters.kinds.dora): the base
holds W (W_res for a PiSSA init), the trainable parameters are A [r, in], B [out, r] and the
magnitude m [out] (pissa's orientation; mlx-lm's DoRALinear holds lora_a [in, r], lora_b [r, out]
and m, converted at the file boundary by pissa.files.formats.mlx_lm). The layer computes
x (m / ||V||) V^T + bias with V = W + s B A, the norm per output row, written as PEFT's forward:

    y = base(x) + (m/||V|| - 1) (base(x) - bias) + (m/||V||) s B A x

With dropout in training, PEFT recomputes W x on the dropped-out x instead of reusing base(x); so
do we (mlx-lm instead scales base(x) + s B A dropout(x) by m/||V||: the same without dropout).
||V|| is a constant for autograd (mx.stop_gradient, as in mlx-lm and PEFT). A quantised base
(QPiSSA) gives its dequantised weight to the norm; merging into it is refused, as for every kind.
"""

from __future__ import annotations

from pissa_mlx.layers.base import AdapterLinear, weight_shape

import mlx.core as mx
from mlx import nn


class DoraLinear(AdapterLinear):
    KIND = "dora"
    PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base: nn.Linear | nn.QuantizedLinear, A: mx.array, B: mx.array, m: mx.array, scale: float,
                 dropout: float = 0.0):
        out_features, in_features = weight_shape(base)
        if A.ndim != 2 or A.shape[1] != in_features or tuple(B.shape) != (out_features, A.shape[0]) \
                or tuple(m.shape) != (out_features,):
            raise ValueError(f"A {tuple(A.shape)}, B {tuple(B.shape)} and magnitude {tuple(m.shape)} do not fit a "
                             f"weight {(out_features, in_features)}")
        super().__init__(base, dropout)
        self.lora_A = A
        self.lora_B = B
        self.lora_magnitude_vector = m
        self.scale = float(scale)
        self._factor = None   # m / ||V|| [out] while merged (a leading "_": not a parameter)

    @classmethod
    def from_params(cls, base: nn.Linear | nn.QuantizedLinear, params: tuple[mx.array, ...], spec) -> "DoraLinear":
        """Wrap `base` (its weight already what the init left) with (A, B, m), the spec's scale and
        dropout. Raises ValueError when they do not fit the weight."""
        A, B, m = params
        return cls(base, A, B, m, spec.scale, spec.dropout)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def update(self, x: mx.array) -> mx.array:
        """s * x A^T B^T, in x's dtype."""
        return ((x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)) * self.scale

    def adapted(self) -> mx.array:
        """V = W + s B A [out, in] (W dequantised for a quantised base), in the wider of the base's
        and the parameters' dtypes, without gradient."""
        return mx.stop_gradient(self.base_weight() + (self.lora_B * self.scale) @ self.lora_A)

    def factor(self) -> mx.array:
        """m / ||V|| [out]; the gradient reaches m only."""
        return self.lora_magnitude_vector / mx.linalg.norm(self.adapted(), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_forward(x)
        if self.merged:
            return y
        ratio = self.factor()
        frozen = y
        if self.dropout is not None and self.training:
            x = self.dropout(x)
            frozen = self.base_forward(x)   # W x on the dropped-out x, as PEFT
        if "bias" in self.base:
            frozen = frozen - self.base.bias
        return y + ((ratio - 1) * frozen + ratio * self.update(x)).astype(y.dtype)

    def delta(self) -> mx.array:
        """m/||V|| V - W [out, in], in the base weight's float dtype: what fuse() adds to the weight."""
        V = self.adapted()
        return (self.factor()[:, None] * V - self.base_weight()).astype(self._dtype())

    def merge(self) -> None:
        """W <- m/||V|| V. unmerge() divides by the same factor and takes s B A off again.

        Raises:
            PissaError: for a quantised base (QPiSSA), as for every kind.
        """
        if self.merged or self.quantized:
            return super().merge()   # nothing to do, or the refusal every kind shares
        self._factor = self.factor()
        self.base.weight = (self._factor[:, None] * self.adapted()).astype(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            lora = (self.lora_B * self.scale) @ self.lora_A
            self.base.weight = (self.base.weight / self._factor[:, None] - lora).astype(self.base.weight.dtype)
            self._factor, self.merged = None, False

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}, quantized={self.quantized}"


LAYER = DoraLinear
