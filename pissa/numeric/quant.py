"""Quantisation references for QPiSSA, in numpy: NF4 (QLoRA) and affine groups (MLX).

These are the definitions the backends must reproduce bit for bit:
- NF4, as bitsandbytes quantises it: the tensor is flattened and cut into blocks of
  `group_size` (64) values; each block is scaled by 1 / absmax (float32 reciprocal, then a
  multiply) and clamped to [-1, 1]; each value takes the index of the nearest of NF4's 16
  levels, with a value exactly on a midpoint going to the lower level. Dequantised:
  level[code] * absmax, in float32.
- Affine, as mx.quantize does it: each row is cut into groups of `group_size`; a group's scale
  and bias come from its min and max, nudged so that the edge with the larger magnitude is
  represented exactly; code = clip(rint((w - bias) / scale), 0, 2^bits - 1). Dequantised:
  scale * code + bias, in float32. The arithmetic below follows MLX's CPU kernel step by step
  in float32, so the codes, scales and biases are identical.

Storage dtypes. The input is float32 holding a weight rounded to its storage dtype (float32,
bfloat16 or float16), and the codes are computed from it in float32 as above, which is what both
libraries do for a bfloat16 or float16 weight: bitsandbytes upcasts it to float32, and MLX's
kernel reads each element as a float. What the storage dtype changes is what comes back:
- NF4: absmax stays float32 (bitsandbytes always keeps it so); the dequantised weight is
  level[code] * absmax in float32, rounded once to the storage dtype (dequantize_4bit returns
  the input's dtype).
- Affine: mx.quantize returns scales and biases in the input's dtype, rounded from the float32
  values the codes were computed with; mx.dequantize then computes in that dtype, rounding the
  product and the sum each: deq = round(round(scale * code) + bias).
Measured on these machines with bitsandbytes 0.50.2 and MLX 0.32.4 (tests check it bit for bit).
Scales, absmax and biases are kept here as float32 arrays holding values of the storage dtype;
codes are kept unpacked (one uint8 per weight); pissa.files.formats.quantized packs them the way each
library stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pissa.errors import PissaError

# QLoRA's NF4 levels, as float32 (bitsandbytes' table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_MIDPOINTS = ((NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)).astype(np.float32)


@dataclass(frozen=True)
class QuantScheme:
    """A quantisation scheme.

    name: "nf4", "int8" or "affine4". kind: "nf4" or "affine". bits: 4 or 8.
    group_size: NF4's block size or the affine group size (values sharing one scale).
    """

    name: str
    kind: str
    bits: int
    group_size: int


SCHEMES = {"nf4": ("nf4", 4), "int8": ("affine", 8), "affine4": ("affine", 4)}
AFFINE_GROUP_SIZES = (32, 64, 128)


def scheme(name: str, group_size: int = 64) -> QuantScheme:
    """The scheme called `name` with `group_size`.

    Raises:
        PissaError: for an unknown name or a group size the scheme cannot use.
    """
    if name not in SCHEMES:
        raise PissaError(f"unknown quantisation scheme {name!r}; choose one of: {', '.join(SCHEMES)}")
    kind, bits = SCHEMES[name]
    if kind == "affine" and group_size not in AFFINE_GROUP_SIZES:
        raise PissaError(f"--group-size {group_size} is not supported by {name} (MLX's affine scheme); "
                         f"choose one of {', '.join(map(str, AFFINE_GROUP_SIZES))}")
    if kind == "nf4" and (group_size < 2 or group_size & (group_size - 1)):
        raise PissaError(f"--group-size {group_size} is not a power of two >= 2, which nf4 blocks need; use 64")
    return QuantScheme(name, kind, bits, group_size)


def check_fits(s: QuantScheme, name: str, shape: tuple[int, ...]) -> None:
    """Refuse a weight whose input dimension the group size does not divide.

    Raises:
        PissaError: naming the weight, its shape and the fix.
    """
    if len(shape) != 2 or shape[1] % s.group_size:
        raise PissaError(f"--group-size {s.group_size} does not divide the input dimension of {name} "
                         f"{tuple(shape)}; choose a group size that divides {shape[-1]}")


@dataclass
class QTensor:
    """A quantised [out, in] matrix on the host.

    codes: uint8 [out, in], unpacked. scales: nf4: absmax float32 [out * in / group];
    affine: [out, in / group]. biases: affine [out, in / group], else None. dtype: the storage
    dtype of the weight that was quantised ("float32", "bfloat16", "float16"): affine scales and
    biases hold values of that dtype (as float32 arrays) and are stored in it; dequantize()
    gives values of it.
    """

    scheme: QuantScheme
    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray | None = None
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def quantize(x: np.ndarray, s: QuantScheme, dtype: str = "float32") -> QTensor:
    """Quantise a float32 [out, in] matrix whose values are those of a weight stored in `dtype`
    (see the module docstring for the exact rules)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"quantize takes float32 input, not {x.dtype}")
    check_fits(s, "the matrix", x.shape)
    q = _nf4(x, s) if s.kind == "nf4" else _affine(x, s)
    q.dtype = dtype
    if q.biases is not None:  # MLX rounds the scale and bias it computed with to the input's dtype
        q.scales, q.biases = round_to(q.scales, dtype), round_to(q.biases, dtype)
    return q


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 x rounded to a storage dtype (round to nearest even), as float32 again."""
    from pissa.numeric.dtypes import np_dtype

    return x if dtype == "float32" else np.asarray(x, np.float32).astype(np_dtype(dtype)).astype(np.float32)


def dequantize(q: QTensor) -> np.ndarray:
    """deq(Q): float32 [out, in], holding values of q.dtype (computed as the library does)."""
    if q.scheme.kind == "nf4":
        g = q.scheme.group_size
        vals = NF4_LEVELS[q.codes.reshape(-1, g)]
        return round_to((vals * q.scales[:, None]).reshape(q.shape), q.dtype)
    g = q.scheme.group_size
    out, n = q.shape
    codes = q.codes.reshape(out, n // g, g).astype(np.float32)
    return round_to(round_to(q.scales[..., None] * codes, q.dtype) + q.biases[..., None], q.dtype).reshape(out, n)


def _nf4(x: np.ndarray, s: QuantScheme) -> QTensor:
    blocks = x.reshape(-1, s.group_size)
    absmax = np.abs(blocks).max(axis=1)
    inv = (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1))
    # searchsorted 'left' gives i with mid[i-1] < v <= mid[i]: a tie goes to the lower level.
    codes = np.searchsorted(NF4_MIDPOINTS, scaled, side="left").astype(np.uint8)
    return QTensor(s, codes.reshape(x.shape), absmax.astype(np.float32))


def _affine(x: np.ndarray, s: QuantScheme) -> QTensor:
    out, n = x.shape
    g = x.reshape(out, n // s.group_size, s.group_size)
    f32 = np.float32
    n_bins = f32((1 << s.bits) - 1)
    w_max, w_min = g.max(axis=-1), g.min(axis=-1)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, f32(1e-7)).astype(f32)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint(edge / scale)
        nonzero = q0 != 0
        scale = np.where(nonzero, edge / np.where(nonzero, q0, f32(1)), scale).astype(f32)
    bias = np.where(nonzero, edge, f32(0)).astype(f32)
    codes = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), f32(0), n_bins)
    return QTensor(s, codes.astype(np.uint8).reshape(out, n), scale, bias)


def nuclear_norm(x: np.ndarray) -> float:
    """Sum of singular values, in float64."""
    return float(np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False).sum())
