"""PissaLinear, the LoRA-shaped kind ("lora"): the base holds W_res (or W, for LoRA's own init)
and the trainable factors are A [r, in] and B [out, r]: y = base(x) + s * (dropout(x) A^T) B^T.
Every LoRA-shaped init (PiSSA, LoRA, OLoRA, MiLoRA) trains this layer."""

from __future__ import annotations

import torch
from torch import nn

from pissa_torch.layers.base import AdapterLinear, weight_shape
from pissa_torch.quantized import compute_dtype


class PissaLinear(AdapterLinear):
    KIND = "lora"
    PARAMS = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: float = 0.0):
        out_features, in_features = weight_shape(base)
        if A.shape != (A.shape[0], in_features) or B.shape != (out_features, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{(out_features, in_features)}")
        super().__init__(base, dropout)
        # The factors live in the base weight's dtype and device unless given otherwise.
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(B.to(base.weight.device))
        self.scale = float(scale)

    @classmethod
    def from_params(cls, base: nn.Module, params: tuple[torch.Tensor, ...], spec) -> "PissaLinear":
        """Wrap `base` (nn.Linear or a quantised linear), whose weight must already be the residual
        W_res, with the kind's parameters (A, B), the spec's scale and dropout."""
        A, B = params
        return cls(base, A, B, spec.scale, spec.dropout)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> torch.Tensor:
        """s * B @ A, [out, in], in the base's compute dtype."""
        return (self.lora_B @ self.lora_A * self.scale).to(compute_dtype(self.base))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * x A^T B^T, in x's dtype. The scale goes on B [out, r] rather than on the output [tokens,
        out] (none at all at s = 1, PiSSA's alpha = r): one kernel over the tokens fewer."""
        a = self.lora_A.to(x.dtype) if self.lora_A.dtype != x.dtype else self.lora_A
        b = self.lora_B.to(x.dtype) if self.lora_B.dtype != x.dtype else self.lora_B
        return (x @ a.T) @ (b.T if self.scale == 1 else b.T * self.scale)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


LAYER = PissaLinear
