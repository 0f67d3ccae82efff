"""FullLinear, full fine-tuning ("full"): the base weight itself trains."""

from __future__ import annotations

import torch
from torch import nn

from pissa.errors import PissaError
from pissa_torch.layers.base import AdapterLinear, is_conv1d
from pissa_torch.quantized import is_quantized


class FullLinear(AdapterLinear):
    """Full fine-tuning of one linear layer: its weight is the trainable parameter (the bias, if
    any, stays frozen like every other non-target weight). y = base(x); nothing to merge."""

    KIND = "full"
    PARAMS = ("weight",)

    def __init__(self, base: nn.Module, W: torch.Tensor | None = None):
        if is_quantized(base):
            raise PissaError("full fine-tuning needs float weights, not a quantised layer")
        if is_conv1d(base):  # its parameter would be the [in, out] weight, against every file's [out, in]
            raise PissaError("full fine-tuning of transformers' Conv1D layers (GPT-2) is not supported yet")
        super().__init__(base)
        if base.weight.dtype not in (torch.float32, torch.float64):
            # The trained weight is a float32 master weight, as an adapter's parameters are, however
            # the frozen model is stored (bf16 under bf16 precision); forward casts it for the matmul.
            base.weight = nn.Parameter(base.weight.detach().float(), requires_grad=False)
        if W is not None:
            if tuple(W.shape) != tuple(base.weight.shape):
                raise ValueError(f"weight {tuple(W.shape)} does not fit {tuple(base.weight.shape)}")
            with torch.no_grad():
                base.weight.copy_(W)

    @classmethod
    def from_params(cls, base: nn.Module, params: tuple[torch.Tensor, ...], spec) -> "FullLinear":
        """No params (the init): train the base weight as it is; (W,): start from W."""
        return cls(base, params[0] if params else None)

    def params(self) -> tuple[nn.Parameter, ...]:
        return (self.base.weight,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias.to(x.dtype) if self.base.bias is not None else None
        return torch.nn.functional.linear(x, self.base.weight.to(x.dtype), bias)

    def delta(self) -> torch.Tensor:
        return torch.zeros_like(self.base.weight)

    def merge(self) -> None:
        """Nothing to do: the trained weight is the layer's weight."""

    def unmerge(self) -> None:
        """Nothing to do."""

    def fuse(self) -> nn.Module:
        return self.base


LAYER = FullLinear
