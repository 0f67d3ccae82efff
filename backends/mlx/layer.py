"""Adapter layers over a frozen mlx.nn.Linear, one class per adapter kind (pissa.adapters.kinds), each
wrapping and unwrapping itself in the mlx-lm style (from_base / fuse):

- AdapterLinear: what every kind shares: the frozen base, merge / unmerge / fuse through the
  kind's dense update delta(), and the names of its trainable parameters (PARAMS);
- PissaLinear (kind "lora"): W_res plus the trainable factors A [r, in] and B [out, r],
  y = x W_res^T + s * (dropout(x) A^T) B^T, the orientation used everywhere in pissa (PEFT's, not
  mlx-lm's [in, r] / [r, out]; pissa.files.formats.mlx_lm converts at the file boundary).
  MoraLinear lives in pissa_mlx.mora;
- FullLinear (kind "full"): full fine-tuning, the base weight itself trains.

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
from pissa.errors import PissaError

QUANTIZED_BASE = ("quantised base layer {name}: PiSSA needs the full-precision weight to decompose; run QPiSSA "
                  "on the unquantised model instead: pissa init MODEL --quantize affine4, then load that folder")
NOT_QPISSA = ("quantised base layer {name} is not a QPiSSA residual (the folder's config.json lists no "
              "pissa_quantization module of that name); load a folder written by pissa init --quantize "
              "affine4|int8, or run pissa init on the unquantised model")
QUANTIZED_MERGE = ("{name} has a quantised base (QPiSSA): merging would requantise it and change the model; "
                   "use fuse() for a full-precision layer, or pissa merge for a full-precision model folder")


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

    def __init__(self, base: nn.Linear | nn.QuantizedLinear):
        super().__init__()
        self.base = base
        self.merged = False
        self.base.freeze()

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


class PissaLinear(AdapterLinear):
    KIND = "lora"
    PARAMS = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear | nn.QuantizedLinear, A: mx.array, B: mx.array, scale: float,
                 dropout: float = 0.0):
        out_features, in_features = weight_shape(base)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_features or B.shape != (out_features, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{(out_features, in_features)}")
        super().__init__(base)
        self.lora_A = A
        self.lora_B = B
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @classmethod
    def from_base(cls, base: nn.Linear | nn.QuantizedLinear, A: mx.array, B: mx.array, scale: float,
                  dropout: float = 0.0) -> "PissaLinear":
        """Wrap `base`, whose weight must already be the residual W_res (or, for an
        nn.QuantizedLinear, its quantisation Q(W_res) from QPiSSA).

        Raises:
            ValueError: when A [r, in] and B [out, r] do not fit the weight [out, in].
        """
        return cls(base, A, B, scale, dropout)

    @classmethod
    def from_params(cls, base: nn.Linear | nn.QuantizedLinear, params: tuple[mx.array, ...], spec) -> "PissaLinear":
        """from_base with the kind's parameters (A, B) and the spec's scale."""
        A, B = params
        return cls(base, A, B, spec.scale)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta(self) -> mx.array:
        """s * B @ A, [out, in], in the base weight's (float) dtype."""
        return ((self.lora_B * self.scale) @ self.lora_A).astype(self._dtype())

    def update(self, x: mx.array) -> mx.array:
        """s * x A^T B^T, in x's dtype."""
        return ((x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)) * self.scale

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}, quantized={self.quantized}"


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
            base.weight = W.astype(base.weight.dtype)

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
        return self.base(x)

    def delta(self) -> mx.array:
        return mx.zeros_like(self.base.weight)

    def merge(self) -> None:
        """Nothing to do: the trained weight is the layer's weight."""

    def unmerge(self) -> None:
        """Nothing to do."""

    def fuse(self) -> nn.Linear:
        return self.base
