"""Adapter layers over a frozen base linear layer, one class per adapter kind (pissa.adapters.kinds), each
wrapping and unwrapping itself in the mlx-lm style (from_base / fuse):

- AdapterLinear: what every kind shares: the frozen base, merge / unmerge / fuse through the
  kind's dense update delta(), and the names of its trainable parameters (PARAMS);
- PissaLinear (kind "lora"): W_res plus the trainable factors A [r, in] and B [out, r],
  y = base(x) + s * (dropout(x) A^T) B^T. MoraLinear lives in pissa_torch.mora;
- FullLinear (kind "full"): full fine-tuning, the base weight itself trains.
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

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.merged = False
        self.out_features, self.in_features = weight_shape(base)

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


class PissaLinear(AdapterLinear):
    KIND = "lora"
    PARAMS = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: float = 0.0):
        out_features, in_features = weight_shape(base)
        if A.shape != (A.shape[0], in_features) or B.shape != (out_features, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{(out_features, in_features)}")
        super().__init__(base)
        # The factors live in the base weight's dtype and device unless given otherwise.
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(B.to(base.weight.device))
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float,
                  dropout: float = 0.0) -> "PissaLinear":
        """Wrap `base` (nn.Linear or a quantised linear), whose weight must already be the residual W_res."""
        return cls(base, A, B, scale, dropout)

    @classmethod
    def from_params(cls, base: nn.Module, params: tuple[torch.Tensor, ...], spec) -> "PissaLinear":
        """from_base with the kind's parameters (A, B) and the spec's scale."""
        A, B = params
        return cls(base, A, B, spec.scale)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> torch.Tensor:
        """s * B @ A, [out, in], in the base's compute dtype."""
        return (self.lora_B @ self.lora_A * self.scale).to(compute_dtype(self.base))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * x A^T B^T, in x's dtype."""
        a = self.lora_A.to(x.dtype) if self.lora_A.dtype != x.dtype else self.lora_A
        b = self.lora_B.to(x.dtype) if self.lora_B.dtype != x.dtype else self.lora_B
        return (x @ a.T @ b.T) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


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
        return self.base(x)

    def delta(self) -> torch.Tensor:
        return torch.zeros_like(self.base.weight)

    def merge(self) -> None:
        """Nothing to do: the trained weight is the layer's weight."""

    def unmerge(self) -> None:
        """Nothing to do."""

    def fuse(self) -> nn.Module:
        return self.base
