"""PissaLinear: a base linear layer holding W_res, plus the trainable factors A [r, in] and B [out, r].

y = base(x) + s * (dropout(x) A^T) B^T. It wraps and unwraps itself in the mlx-lm style:
PissaLinear.from_base(linear, A, B, scale) and layer.fuse() -> nn.Linear.
The base is an nn.Linear, or for QPiSSA a quantised one (a bitsandbytes Linear4bit or an
AffineQuantLinear, see pissa_torch.quantized) holding deq(Q(W_res)): forward and fuse work on
it, merge refuses (adding s*B@A into a quantised weight would re-quantise it, which changes
the model and cannot be undone).
"""

from __future__ import annotations

import torch
from torch import nn

from pissa.errors import PissaError
from pissa_torch.quantized import compute_dtype, dequantized_weight, is_quantized


class PissaLinear(nn.Module):
    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: float = 0.0):
        super().__init__()
        out_features, in_features = base.out_features, base.in_features
        if A.shape != (A.shape[0], in_features) or B.shape != (out_features, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{(out_features, in_features)}")
        self.base = base
        self.base.requires_grad_(False)
        # The factors live in the base weight's dtype and device unless given otherwise.
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(B.to(base.weight.device))
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def from_base(cls, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float,
                  dropout: float = 0.0) -> "PissaLinear":
        """Wrap `base` (nn.Linear or a quantised linear), whose weight must already be the residual W_res."""
        return cls(base, A, B, scale, dropout)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> torch.Tensor:
        """s * B @ A, [out, in], in the base's compute dtype."""
        return (self.lora_B @ self.lora_A * self.scale).to(compute_dtype(self.base))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A.to(x.dtype) if self.lora_A.dtype != x.dtype else self.lora_A
        b = self.lora_B.to(x.dtype) if self.lora_B.dtype != x.dtype else self.lora_B
        return y + (self.dropout(x) @ a.T @ b.T) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add s*B@A into the base weight; forward then skips the adapter. unmerge() undoes it.

        Raises:
            PissaError: on a quantised base (QPiSSA), which cannot take the sum exactly.
        """
        if is_quantized(self.base):
            raise PissaError("cannot merge an adapter into a quantised base (QPiSSA): it would re-quantise the "
                             "weight; run `pissa merge` on the unquantised model, or fuse() for a float layer")
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """A plain nn.Linear computing W_res + s*B@A (this layer is left unchanged). On a quantised
        base it is deq(Q(W_res)) + s*B@A in the compute dtype: the function the layer computes,
        as a float layer (as large as the unquantised one)."""
        weight = dequantized_weight(self.base)
        fused = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                          device=weight.device, dtype=compute_dtype(self.base))
        fused.weight.copy_(weight if self.merged else weight + self.delta())
        if self.base.bias is not None:
            fused.bias.copy_(self.base.bias)
        return fused

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"
