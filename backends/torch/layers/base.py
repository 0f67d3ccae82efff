"""What every adapter layer shares, over a frozen base linear layer: pissa_torch.layers holds one
module per adapter kind (pissa.adapters.kinds), each a class (its module's LAYER) that wraps and
unwraps itself in the mlx-lm style (from_params / fuse). AdapterLinear holds the frozen base,
the dropout on the adapter's input, merge / unmerge / fuse through the kind's dense update
delta(), and the names of its trainable parameters (PARAMS).

The base is an nn.Linear, or for QPiSSA a quantised one (a bitsandbytes Linear4bit or an
AffineQuantLinear, see pissa_torch.quantized) holding deq(Q(W_res)): forward and fuse work on
it, merge refuses (adding s*B@A into a quantised weight would re-quantise it, which changes
the model and cannot be undone). It may also be transformers' Conv1D (GPT-2), whose weight is
stored [in, out]: as PEFT's fan_in_fan_out, the factors keep their shapes and only the base
weight is seen transposed (weight_shape, dense_weight), and fuse gives a Conv1D back.
"""

from __future__ import annotations

import torch
from torch import nn

from pissa.errors import PissaError
from pissa_torch.quantized import compute_dtype, dequantized_weight, is_quantized


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def weight_shape(base: nn.Module) -> tuple[int, int]:
    """[out, in] of a linear layer: nn.Linear, a quantised one, or a Conv1D ([in, out] stored)."""
    if is_conv1d(base):
        return base.nf, base.nx
    return base.out_features, base.in_features


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base's float weight as [out, in]: a view of a Conv1D's stored [in, out] weight (so that
    in-place updates reach it), or what dequantized_weight gives."""
    return base.weight.T if is_conv1d(base) else dequantized_weight(base)


class AdapterLinear(nn.Module):
    """The part every adapter kind shares. Subclasses set KIND and PARAMS, and define update(x)
    (the adapter's output for an input x) and delta() (the dense update [out, in] in the base's
    compute dtype); the forward is base(x) + update(dropout(x)) until merged."""

    KIND: str = ""
    PARAMS: tuple[str, ...] = ()   # trainable parameters, in the order of the kind's TENSORS

    def __init__(self, base: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.merged = False
        self.out_features, self.in_features = weight_shape(base)
        # PEFT's lora_dropout: on the adapter's input only, in training mode only.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base)

    def params(self) -> tuple[nn.Parameter, ...]:
        return tuple(getattr(self, name) for name in self.PARAMS)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.update(self.dropout(x)).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then skips the adapter. unmerge() undoes it.

        Raises:
            PissaError: on a quantised base (QPiSSA), which cannot take the sum exactly.
        """
        if is_quantized(self.base):
            raise PissaError("cannot merge an adapter into a quantised base (QPiSSA): it would re-quantise the "
                             "weight; run `pissa merge` on the unquantised model, or fuse() for a float layer")
        if not self.merged:
            dense_weight(self.base).add_(self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            dense_weight(self.base).sub_(self.delta())
            self.merged = False

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """A plain nn.Linear computing base + update (this layer is left unchanged). On a quantised
        base it is deq(Q(W_res)) + s*B@A in the compute dtype: the function the layer computes,
        as a float layer (as large as the unquantised one). On a Conv1D base, a Conv1D."""
        weight = dense_weight(self.base)
        weight = weight if self.merged else weight + self.delta()
        if is_conv1d(self.base):
            from transformers.pytorch_utils import Conv1D

            fused = Conv1D(self.out_features, self.in_features).to(weight.device, weight.dtype)
            fused.weight.copy_(weight.T)
            fused.bias.copy_(self.base.bias)
            return fused
        fused = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                          device=weight.device, dtype=compute_dtype(self.base))
        fused.weight.copy_(weight)
        if self.base.bias is not None:
            fused.bias.copy_(self.base.bias)
        return fused
