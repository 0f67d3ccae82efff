"""What every adapter layer shares, over a frozen mlx.nn.Linear: pissa_mlx.layers holds one module
per adapter kind (pissa.adapters.kinds), each a class (its module's LAYER) that wraps and unwraps
itself in the mlx-lm style (from_params / fuse). AdapterLinear holds the frozen base, the dropout
on the adapter's input, merge / unmerge / fuse through the kind's dense update delta(), and the
names of its trainable parameters (PARAMS). Every tensor keeps pissa's orientation (A [r, in],
B [out, r]: PEFT's, not mlx-lm's [in, r] / [r, out]; pissa.files.formats.mlx_lm converts at the
file boundary).

QPiSSA: the base may be an nn.QuantizedLinear holding Q(W_res), as mlx-lm loads the residual
model that `pissa init --quantize affine4|int8` writes; y = deq(Q(W_res)) x + s B A x, the base
frozen and only A and B trained. merge()/unmerge() refuse such a base (adding s*B@A into a
quantised weight would requantise it: the function would change and unmerge could not undo it);
fuse() dequantises, giving the float nn.Linear deq(Q(W_res)) + s*B@A exactly.
On the CPU a quantised base computes x deq(Q)^T with a dense matmul (see dequantized_matmul).
"""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx import nn
from pissa.adapters.model import QUANTIZED_MERGE
from pissa.errors import PissaError

def weight_shape(base: nn.Module) -> tuple[int, int]:
    """[out, in] of an nn.Linear or nn.QuantizedLinear (whose weight holds 32 / bits codes per word)."""
    out_features, cols = base.weight.shape
    if isinstance(base, nn.QuantizedLinear):
        return out_features, cols * 32 // base.bits
    return out_features, cols


@functools.cache
def dequantized_matmul(group_size: int, bits: int, mode: str):
    """f(x, w, scales, biases) = x @ dequantize(w)^T, whose backward dequantises w again.

    Why: MLX's CPU quantized_matmul has no BLAS behind it. Measured here (x [1024, 576], W
    [1536, 576], affine4): 0.80 s against 0.011 s for dequantise + float32 matmul, which made a
    QPiSSA training step on SmolLM2 about 20x slower than PiSSA's. Dequantising inside a plain
    graph would keep every layer's float weight alive until the backward pass (fp32 memory);
    the custom vjp recomputes it instead, so only one float weight exists at a time.
    The weights get no gradient (the base is frozen)."""
    def deq(w, scales, biases):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)

    @mx.custom_function
    def f(x, w, scales, biases):
        return x @ deq(w, scales, biases).T.astype(x.dtype)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        return (cotangent @ deq(w, scales, biases).astype(cotangent.dtype), mx.zeros_like(w),
                mx.zeros_like(scales), mx.zeros_like(biases))

    return f


def quantized_forward(base: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """base(x), through dequantized_matmul on the CPU (affine mode; elsewhere base(x) itself)."""
    if mx.default_device() != mx.cpu or base.mode != "affine" or "biases" not in base:
        return base(x)
    y = dequantized_matmul(base.group_size, base.bits, base.mode)(x, base.weight, base.scales, base.biases)
    return y + base.bias if "bias" in base else y


class AdapterLinear(nn.Module):
    """The part every adapter kind shares. Subclasses set KIND and PARAMS, and define update(x)
    (the adapter's output for an input x) and delta() (the dense update [out, in] in the base
    weight's float dtype); the forward is base(x) + update(dropout(x)) until merged."""

    KIND: str = ""
    PARAMS: tuple[str, ...] = ()   # trainable parameters, in the order of the kind's TENSORS

    def __init__(self, base: nn.Linear | nn.QuantizedLinear, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.merged = False
        self.base.freeze()
        # PEFT's lora_dropout: on the adapter's input only, in training mode only.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def params(self) -> tuple[mx.array, ...]:
        return tuple(self[name] for name in self.PARAMS)

    def param_paths(self) -> tuple[str, ...]:
        """The trainable parameters' paths relative to this layer ("lora_A", "base.weight")."""
        return self.PARAMS

    def unfreeze_params(self) -> None:
        self.unfreeze(keys=list(self.PARAMS), recurse=False)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base, nn.QuantizedLinear)

    def _dtype(self) -> mx.Dtype:
        # A quantised weight is uint32 words; its float dtype is that of its scales.
        return self.base.scales.dtype if self.quantized else self.base.weight.dtype

    def update(self, x: mx.array) -> mx.array:
        raise NotImplementedError

    def delta(self) -> mx.array:
        raise NotImplementedError

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_forward(x)
        if self.merged:
            return y
        if self.dropout is not None:
            x = self.dropout(x)
        return y + self.update(x).astype(y.dtype)

    def base_weight(self) -> mx.array:
        """The base's weight as floats [out, in]: W_res, or deq(Q(W_res)) for a quantised base."""
        if not self.quantized:
            return self.base.weight
        b = self.base
        return mx.dequantize(b.weight, b.scales, b.get("biases"), group_size=b.group_size, bits=b.bits,
                             mode=b.mode)

    def base_forward(self, x: mx.array) -> mx.array:
        return quantized_forward(self.base, x) if self.quantized else self.base(x)

    def merge(self) -> None:
        """Add the update into the base weight; the forward then skips the adapter. unmerge() undoes it.

        Raises:
            PissaError: for a quantised base (QPiSSA); see the module docstring.
        """
        if self.quantized:
            raise PissaError(QUANTIZED_MERGE.format(name="this layer"))
        if not self.merged:
            self.base.weight = self.base.weight + self.delta()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base.weight = self.base.weight - self.delta()
            self.merged = False

    def fuse(self) -> nn.Linear:
        """A plain nn.Linear computing base + update (this layer is left unchanged). For a
        quantised base, deq(Q(W_res)) + s*B@A in the scales' dtype: the same function, in full
        precision (it is not requantised)."""
        out_features, in_features = weight_shape(self.base)
        has_bias = "bias" in self.base
        fused = nn.Linear(in_features, out_features, bias=has_bias)
        fused.weight = self.base.weight if self.merged else self.base_weight() + self.delta()
        if has_bias:
            fused.bias = self.base.bias
        return fused
