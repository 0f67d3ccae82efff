"""FullLinear, full fine-tuning ("full"): the base weight itself trains."""

from __future__ import annotations

from pissa_mlx.layers.base import AdapterLinear

import mlx.core as mx
from mlx import nn
from pissa.errors import PissaError


class FullLinear(AdapterLinear):
    """Full fine-tuning of one linear layer: its weight is the trainable parameter (the bias, if
    any, stays frozen like every other non-target weight). y = base(x); nothing to merge."""

    KIND = "full"
    PARAMS = ("weight",)

    def __init__(self, base: nn.Linear, W: mx.array | None = None):
        if isinstance(base, nn.QuantizedLinear):
            raise PissaError("full fine-tuning needs float weights, not a quantised layer")
        super().__init__(base)
        if W is not None:
            if tuple(W.shape) != tuple(base.weight.shape):
                raise ValueError(f"weight {tuple(W.shape)} does not fit {tuple(base.weight.shape)}")
            base.weight = W
        if base.weight.dtype not in (mx.float32, mx.float64):
            # The trained weight is a float32 master weight, as an adapter's parameters are, however
            # the frozen model is stored (bf16 under bf16 precision); __call__ casts it for the matmul.
            base.weight = base.weight.astype(mx.float32)

    @classmethod
    def from_params(cls, base: nn.Linear, params: tuple[mx.array, ...], spec) -> "FullLinear":
        """No params (the init): train the base weight as it is; (W,): start from W."""
        return cls(base, params[0] if params else None)

    def params(self) -> tuple[mx.array, ...]:
        return (self.base.weight,)

    def param_paths(self) -> tuple[str, ...]:
        return ("base.weight",)

    def unfreeze_params(self) -> None:
        self.base.unfreeze(keys=["weight"], recurse=False)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.base.weight.astype(x.dtype).T
        return y + self.base.bias.astype(x.dtype) if "bias" in self.base else y

    def delta(self) -> mx.array:
        return mx.zeros_like(self.base.weight)

    def merge(self) -> None:
        """Nothing to do: the trained weight is the layer's weight."""

    def unmerge(self) -> None:
        """Nothing to do."""

    def fuse(self) -> nn.Linear:
        return self.base


LAYER = FullLinear
