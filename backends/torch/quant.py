"""The torch quantisers for QPiSSA, bit-identical to the numpy references in pissa.numeric.quant.

- nf4 goes through bitsandbytes itself (quantize_4bit / dequantize_4bit, on the tensor's device),
  so the codes are by construction what a bitsandbytes Linear4bit stores; the test suite checks
  they equal pissa.numeric.quant's reference.
- affine (int8, affine4) is pissa.numeric.quant._affine transcribed op for op in float32 torch, so it runs
  on CUDA too. Every step is one IEEE float32 operation (no fused multiply-add: torch's eager
  kernels round after each op), which is what makes the results bit-identical to numpy's.
- A weight stored in bfloat16 or float16 is quantised from that dtype as the libraries do
  (pissa.numeric.quant's docstring): bitsandbytes gets the bfloat16 tensor itself; the affine scales and
  biases are rounded to it and the dequantisation computed in it, one rounding per op as MLX.
"""

from __future__ import annotations

import numpy as np
import torch

from pissa.numeric.quant import QTensor, QuantScheme, check_fits


STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize(x: torch.Tensor, s: QuantScheme, dtype: str = "float32") -> tuple[QTensor, torch.Tensor]:
    """Quantise x [out, in] (values of a weight stored in `dtype`) with scheme s.

    Returns:
        (QTensor on the host: unpacked uint8 codes and scales / absmax / biases as float32 arrays,
        as pissa.numeric.quant.quantize gives them; deq(Q(x)) on x's device in x's dtype).

    Raises:
        PissaError: when the group size does not divide the input dimension.
    """
    check_fits(s, "the matrix", tuple(x.shape))
    stored = x.to(torch.float32).to(STORAGE[dtype])  # exact: x holds values of that dtype
    q, deq = _nf4(stored, s) if s.kind == "nf4" else _affine(stored.to(torch.float32), s, STORAGE[dtype])
    q.dtype = dtype
    return q, deq.to(x.dtype)


def _nf4(x: torch.Tensor, s: QuantScheme) -> tuple[QTensor, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(x.contiguous(), blocksize=s.group_size, quant_type="nf4",
                                       compress_statistics=False)
    deq = bnbf.dequantize_4bit(packed, state).reshape(x.shape)  # in x's dtype, as bitsandbytes keeps it
    codes = unpack_nibbles(packed, x.numel()).reshape(x.shape)
    return QTensor(s, codes.cpu().numpy(), state.absmax.to(torch.float32).cpu().numpy()), deq


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes' packed 4-bit codes -> uint8 [n], two codes per byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1)[:n]


def _affine(x: torch.Tensor, s: QuantScheme, storage: torch.dtype) -> tuple[QTensor, torch.Tensor]:
    out, n = x.shape
    g = x.reshape(out, n // s.group_size, s.group_size)
    w_max, w_min = g.amax(dim=-1), g.amin(dim=-1)
    # A full tensor, not a Python scalar: torch divides by a scalar as a multiply by its
    # reciprocal (on CUDA), which is not the correctly rounded quotient numpy computes.
    n_bins = torch.full_like(w_max, float((1 << s.bits) - 1))
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp_min((w_max - w_min) / n_bins, np.float32(1e-7).item())
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)  # round half to even, as np.rint
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / torch.where(nonzero, q0, torch.ones_like(q0)), scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    codes = torch.clamp(torch.round((g - bias[..., None]) / scale[..., None]), 0.0, float((1 << s.bits) - 1))
    # The codes come from the float32 scale and bias; what is stored is their rounding to the
    # weight's dtype, as mx.quantize returns them.
    scale, bias = scale.to(storage), bias.to(storage)
    deq = dequantize_affine(codes, scale, bias)
    q = QTensor(s, codes.to(torch.uint8).reshape(out, n).cpu().numpy(), scale.float().cpu().numpy(),
                bias.float().cpu().numpy())
    return q, deq


def dequantize_affine(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """scale * code + bias in the scales' dtype, as pissa.numeric.quant.dequantize (a multiply, then an
    add, each rounded to that dtype; codes up to 255 are exact in every float dtype).

    codes [out, in] (any integer or float dtype) or already grouped [out, in / g, g];
    scales, biases [out, in / g], one float dtype. Returns float32 [out, in].
    """
    out, groups = scales.shape
    c = codes.reshape(out, groups, -1).to(scales.dtype)
    return (scales[..., None] * c + biases[..., None]).reshape(out, -1).to(torch.float32)
