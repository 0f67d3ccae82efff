"""Quantised base layers for QPiSSA training, and the loader for every residual-model folder.

`pissa init --quantize` writes the residual model in one of two layouts (pissa.files.formats.quantized):
- nf4: transformers' bitsandbytes 4-bit serialisation. transformers itself builds the
  bitsandbytes Linear4bit layers from it (CPU or CUDA).
- int8 / affine4: mlx-lm's quantised layout, which transformers cannot read. Its quantised
  layers become AffineQuantLinear, a frozen module that keeps the packed codes and dequantises
  in forward.
`load_base` reads a plain, nf4 or affine folder alike; PissaLinear wraps any of these bases.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pissa.errors import PissaError
from pissa.files.formats import quantized as qformat
from pissa_torch.quant import dequantize_affine


class _AffineMatmul(torch.autograd.Function):
    """y = x @ deq(Q)^T that saves the packed codes, not the dequantised weight, for backward:
    otherwise autograd would keep a float copy of every layer's weight alive until the
    backward pass, and QPiSSA training would peak at the memory of the unquantised model."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class AffineQuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored in mlx-lm's affine layout.

    Buffers: weight int32 [out, in * bits / 32] (mlx-lm's uint32 words, same bits), scales and
    biases float32 [out, in / group_size], and an optional float bias [out]. forward(x) =
    x @ deq(Q)^T (+ bias) with deq(Q) = scale * code + bias in float32, bit-identical to
    pissa.numeric.quant.dequantize. Nothing here is trainable.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        out, words = weight.shape
        self.in_features, self.out_features = words * 32 // bits, out
        self.bits, self.group_size = bits, group_size
        if scales.shape != (out, self.in_features // group_size) or biases.shape != scales.shape:
            raise ValueError(f"scales {tuple(scales.shape)} and biases {tuple(biases.shape)} do not fit a "
                             f"{bits}-bit weight [{out}, {self.in_features}] with group size {group_size}")
        self.register_buffer("weight", weight.contiguous().view(torch.int32))
        self.register_buffer("scales", scales.to(torch.float32))
        self.register_buffer("biases", biases.to(torch.float32))
        self.register_buffer("bias", bias)
        shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
        self.register_buffer("_shifts", shifts, persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32

    def codes(self) -> torch.Tensor:
        """uint8 [out, in]: the unpacked codes (element k of a word in bits k*b..k*b+b-1)."""
        c = (self.weight[..., None] >> self._shifts) & ((1 << self.bits) - 1)
        return c.reshape(self.out_features, self.in_features).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """deq(Q): float32 [out, in]."""
        return dequantize_affine(self.codes(), self.scales, self.biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _AffineMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether module is a bitsandbytes Linear4bit (checked without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, AffineQuantLinear) or is_bnb_4bit(module)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float weight [out, in] a (possibly quantised) linear layer computes with."""
    if isinstance(module, AffineQuantLinear):
        return module.dequantize()
    if is_bnb_4bit(module):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a linear layer computes in (a quantised weight's storage dtype is not)."""
    if is_quantized(module):
        return module.compute_dtype or torch.float32
    return module.weight.dtype


def load_base(model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """The transformers model of a residual-model folder, plain or written by `pissa init --quantize`.

    Plain: AutoModelForCausalLM.from_pretrained. nf4: the same; transformers builds bitsandbytes
    Linear4bit layers (their compute dtype stays float32 from the config). int8 / affine4: the
    model is built from its config and each quantised module becomes an AffineQuantLinear.
    Returns the model on `device` (default: where it was loaded, the CPU).

    Raises:
        PissaError: for an nf4 folder without bitsandbytes installed, or a folder whose tensors
            do not fit its model (every mismatch listed).
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    scheme = qformat.scheme_of(config)
    if scheme is None or scheme.kind == "nf4":
        kwargs = {"device_map": {"": str(device)}} if scheme is not None and device else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
        except ImportError as e:
            raise PissaError(f"{model_dir} holds an nf4-quantised residual (QPiSSA), which needs bitsandbytes "
                             f"({e}); install it with: pip install 'pissa[torch]'") from None
        if scheme is not None:
            _check_quantized(model, config, model_dir)
            for module in model.modules():
                if is_bnb_4bit(module):
                    # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place at the
                    # first no-grad eval forward and then computes in bfloat16. Keep float32
                    # arithmetic and the serialised layout, so eval matches training.
                    module.support_avx512bf16_for_cpu = False
    else:
        model = _load_affine(model_dir, config, scheme, dtype)
    if device and not (scheme is not None and scheme.kind == "nf4"):  # nf4 went to device_map
        model.to(device)
    return model


def _load_affine(model_dir: Path, config: dict, scheme, dtype: torch.dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights  # skip the random init we overwrite
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = nullcontext
    cfg = AutoConfig.from_pretrained(model_dir)
    for key in ("quantization", "quantization_config", "pissa_quantization"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    problems = []
    for name in config["pissa_quantization"]["modules"]:
        keys = [f"{name}.weight", f"{name}.scales", f"{name}.biases"]
        absent = [k for k in keys if k not in state]
        if absent:
            problems.append(f"missing {', '.join(absent)}")
            for k in keys + [f"{name}.bias"]:
                state.pop(k, None)
            continue
        try:
            linear = model.get_submodule(name)
            layer = AffineQuantLinear(*(state.pop(k) for k in keys), scheme.bits, scheme.group_size,
                                      state.pop(f"{name}.bias", None))
        except (AttributeError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        if (layer.out_features, layer.in_features) != (linear.out_features, linear.in_features):
            problems.append(f"{name}: stored [{layer.out_features}, {layer.in_features}], model "
                            f"[{linear.out_features}, {linear.in_features}]")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    quantized = set(config["pissa_quantization"]["modules"])
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    problems += [f"missing {k}" for k in missing if k not in tied and k.rpartition(".")[0] not in quantized]
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        raise PissaError(f"{model_dir} does not fit its config ({len(problems)} problems): " + "; ".join(problems))
    return model


def _check_quantized(model: nn.Module, config: dict, model_dir: Path) -> None:
    """transformers skips quantisation silently in some set-ups; refuse a model where it did."""
    modules = dict(model.named_modules())
    plain = [m for m in config["pissa_quantization"]["modules"] if not is_bnb_4bit(modules.get(m, nn.Identity()))]
    if plain:
        raise PissaError(f"{model_dir}: transformers did not load {len(plain)} nf4 modules as bitsandbytes Linear4bit "
                         f"(first: {plain[0]}); check that bitsandbytes imports (python -m bitsandbytes)")
