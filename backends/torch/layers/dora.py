"""DoraLinear, DoRA ("dora"; the math and its float64 oracle: pissa.adapters.kinds.dora): the base
holds W (W_res for a PiSSA init), the trainable parameters are A [r, in], B [out, r] and the
magnitude m [out], and the layer computes x (m / ||V||) V^T + bias with V = W + s B A, the norm
per output row, as PEFT does (peft/tuners/lora/variants.py DoraLinearVariant):

    y = base(x) + (m/||V|| - 1) (base(x) - bias) + (m/||V||) s B A x

With dropout in training, PEFT recomputes W x on the dropped-out x instead of reusing base(x);
so do we. ||V|| is a constant for autograd (PEFT's .detach(), the paper's section 4.3), which
also keeps the dense V out of the backward graph. A quantised base (QPiSSA) gives its
dequantised weight to the norm; merging into it is refused, as for every kind.
"""

from __future__ import annotations

import torch
from torch import nn

from pissa_torch.layers.base import AdapterLinear, dense_weight, weight_shape
from pissa_torch.quantized import compute_dtype


class DoraLinear(AdapterLinear):
    KIND = "dora"
    PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, scale: float,
                 dropout: float = 0.0):
        out_features, in_features = weight_shape(base)
        if A.ndim != 2 or A.shape[1] != in_features or B.shape != (out_features, A.shape[0]) \
                or m.shape != (out_features,):
            raise ValueError(f"A {tuple(A.shape)}, B {tuple(B.shape)} and magnitude {tuple(m.shape)} do not fit a "
                             f"weight {(out_features, in_features)}")
        super().__init__(base, dropout)
        device = base.weight.device
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(B.to(device))
        self.lora_magnitude_vector = nn.Parameter(m.to(device))
        self.scale = float(scale)
        self._factor = None   # m / ||V|| [out] while merged: the merged weight's own norm is another

    @classmethod
    def from_params(cls, base: nn.Module, params: tuple[torch.Tensor, ...], spec) -> "DoraLinear":
        """Wrap `base` (its weight already what the init left) with (A, B, m), the spec's scale and
        dropout. Raises ValueError when they do not fit the weight."""
        A, B, m = params
        return cls(base, A, B, m, spec.scale, spec.dropout)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * x A^T B^T, in x's dtype."""
        return (x @ self.lora_A.to(x.dtype).T @ self.lora_B.to(x.dtype).T) * self.scale

    def _dtype(self) -> torch.dtype:
        # The wider of the base's compute dtype and the parameters': float32 over bf16 frozen weights.
        return torch.promote_types(compute_dtype(self.base), self.lora_A.dtype)

    @torch.no_grad()
    def adapted(self) -> torch.Tensor:
        """V = W + s B A [out, in], W dequantised for a quantised base, in the wider of the base's
        compute dtype and the parameters' (float32 over bf16 weights); no gradient, and no autocast."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            dtype = self._dtype()
            return dense_weight(self.base).to(dtype) + (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale

    def factor(self) -> torch.Tensor:
        """m / ||V|| [out]; the gradient reaches m only."""
        V = self.adapted()
        return self.lora_magnitude_vector.to(V.dtype) / torch.linalg.vector_norm(V, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        ratio = self.factor()
        frozen = y
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            frozen = self.base(x)   # W x on the dropped-out x, as PEFT
        bias = getattr(self.base, "bias", None)
        if bias is not None:
            frozen = frozen - bias
        return y + ((ratio - 1) * frozen + ratio * self.update(x)).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """m/||V|| V - W [out, in], in the base's compute dtype: what fuse() adds to the weight."""
        with torch.no_grad():
            V = self.adapted()
            return (self.factor()[:, None] * V - dense_weight(self.base).to(V.dtype)).to(compute_dtype(self.base))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- m/||V|| V. unmerge() divides by the same factor and takes s B A off again.

        Raises:
            PissaError: on a quantised base (QPiSSA), which cannot take the product exactly.
        """
        if self.merged or self.quantized:
            return super().merge()   # nothing to do, or the refusal every kind shares
        self._factor = self.factor()
        weight = dense_weight(self.base)
        weight.copy_((self._factor[:, None] * self.adapted()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = dense_weight(self.base)
            dtype = self._dtype()
            lora = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale
            restored = weight.to(dtype) / self._factor[:, None] - lora
            weight.copy_(restored.to(weight.dtype))
            self._factor, self.merged = None, False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


LAYER = DoraLinear
