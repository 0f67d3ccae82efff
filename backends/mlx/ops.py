"""pissa.numeric.ops.Ops for MLX: the decomposition on the CPU, or its matmuls on the GPU (Apple silicon).

MLX's quirks, and what we do about them:
- mx.linalg.svd and mx.linalg.qr run only on a CPU stream, in float32 or float64.
- Metal has no float64: at float64 compute every operation runs on the CPU stream (scope()).
  At float32 compute the matmuls use the default device (the GPU on a Mac) and only the
  factorisations go to the CPU.
- mx.array(np.float64 array) silently gives float32: the dtype is always passed.
- mx.linalg.svd always builds the full U [m, m] and V^T [n, n] (2 s for 576x1536, 19 s for
  2048x2048 on these machines), so svd() factors W = QR first and takes the SVD of the small
  square R only.
- mx.quantize takes float32, bfloat16 or float16 (float64 input fails: "Only supports floating
  point inputs"), returns scales and biases in the input's dtype, and packs the codes into uint32
  words; quantize() casts to the storage dtype, and unpacks for the core's QTensor.
"""

from __future__ import annotations

import contextlib

import numpy as np

import mlx.core as mx
from pissa.errors import PissaError
from pissa.files.formats.quantized import unpack_bits
from pissa.numeric.quant import QTensor, QuantScheme

_DTYPES = {"float64": mx.float64, "float32": mx.float32}
_STORAGE = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class MlxOps:
    """Ops on one MLX device ("cpu" or "gpu").

    svd_batch: 1. Measured on the CPU (float64, r=16, 8 x 576x576, 2 cores): full SVD batched
    0.81 s against a loop's 0.59-0.77 s, randomised 0.08-0.09 s against 0.06-0.08 s; a batch
    only holds 8 matrices at once. On Apple GPUs the factorisations run on the CPU anyway.
    """

    name = "mlx"
    # MLX's affine scheme only: there is no NF4 in MLX, so pissa.numeric.qpissa.check_backend refuses it.
    quant_schemes = ("int8", "affine4")

    def __init__(self, device: mx.Device):
        self.device = device
        self.svd_batch = 1

    def scope(self, compute_dtype: str):
        """The stream the decomposition's arithmetic runs on (pissa.numeric.decompose enters it)."""
        if compute_dtype == "float64" or self.device == mx.cpu:
            return mx.stream(mx.cpu)
        return mx.stream(self.device) if self.device is not None else contextlib.nullcontext()

    def asarray(self, a: np.ndarray, dtype: str) -> mx.array:
        return mx.array(np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32), dtype=_DTYPES[dtype])

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x, copy=True)

    def t(self, x: mx.array) -> mx.array:
        return mx.swapaxes(x, -1, -2)

    def qr(self, x: mx.array) -> mx.array:
        # mx.linalg.qr is the reduced QR already: Q [m, n] for m >= n.
        return mx.linalg.qr(x, stream=mx.cpu)[0]

    def svd(self, x: mx.array):
        # Thin SVD through QR, because mx.linalg.svd would build the full square U or V^T:
        #   m >= n: W = Q R, R = Ur S Vt        -> U = Q Ur,  Vt
        #   m <  n: W^T = Q R, W = R^T Q^T, R^T = U S Vr^T -> U, Vt = Vr^T Q^T
        m, n = x.shape[-2:]
        tall = m >= n
        Q, R = mx.linalg.qr(x if tall else self.t(x), stream=mx.cpu)
        small = R if tall else self.t(R)
        U, S, Vt = mx.linalg.svd(small, stream=mx.cpu)
        U, Vt = (Q @ U, Vt) if tall else (U, Vt @ self.t(Q))
        # Evaluate per matrix: the factors are materialised now and the graph (Q, R, the full
        # square factors of R) is released, so memory stays at a few matrices.
        mx.eval(U, S, Vt)
        return U, S, Vt

    def sqrt(self, x: mx.array) -> mx.array:
        return mx.sqrt(x)

    def column_signs(self, u: mx.array) -> mx.array:
        idx = mx.expand_dims(mx.argmax(mx.abs(u), axis=-2), -2)
        signs = mx.sign(mx.take_along_axis(u, idx, axis=-2)).squeeze(-2)
        return mx.where(signs == 0, mx.ones_like(signs), signs)

    def round_to(self, x: mx.array, dtype: str) -> mx.array:
        return x.astype(mx.float32).astype(_STORAGE[dtype]).astype(x.dtype)

    def quantize(self, x: mx.array, scheme: QuantScheme, dtype: str = "float32") -> tuple[QTensor, mx.array]:
        """mx.quantize of x [out, in] (compute dtype, values of the storage dtype `dtype`), cast to
        that dtype first, as mlx-lm quantises a model stored in it.

        Returns (QTensor: codes uint8 [out, in] unpacked, scales and biases [out, in / group] as
        float32 arrays of dtype's values, bit-identical to pissa.numeric.quant's reference; deq(Q(x)) in
        x's dtype).
        Both run on the CPU stream: MLX's CPU kernel is the one checked bit for bit against the
        reference, quantising is cheap next to the SVDs, and float64 could not go to Metal anyway.

        Raises:
            ValueError: for a scheme that is not affine (nf4), which MLX does not have.
        """
        if scheme.kind != "affine":
            raise ValueError(f"MLX cannot quantise {scheme.name}; use int8 or affine4")
        g, bits = scheme.group_size, scheme.bits
        stored = x.astype(mx.float32).astype(_STORAGE[dtype])  # exact: x holds values of that dtype
        words, scales, biases = mx.quantize(stored, group_size=g, bits=bits, stream=mx.cpu)
        deq = mx.dequantize(words, scales, biases, group_size=g, bits=bits, stream=mx.cpu).astype(x.dtype)
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)  # exact
        mx.eval(words, scales, biases, deq)
        codes = unpack_bits(np.asarray(words), bits)
        return QTensor(scheme, codes, np.array(scales, copy=True), np.array(biases, copy=True), dtype), deq

    def svdvals(self, x: mx.array) -> mx.array:
        """Singular values of x [m, n] (descending), in x's dtype; LAPACK skips U and V^T here."""
        s = mx.linalg.svd(x, compute_uv=False, stream=mx.cpu)
        mx.eval(s)
        return s

    def log_softmax(self, x: mx.array) -> mx.array:
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    exp, expm1, log1p = staticmethod(mx.exp), staticmethod(mx.expm1), staticmethod(mx.log1p)

    def sum_last(self, x: mx.array, keepdims: bool = False) -> mx.array:
        return x.sum(axis=-1, keepdims=keepdims)

    def max_last(self, x: mx.array) -> mx.array:
        return x.max(axis=-1)

    def minimum(self, x: mx.array, bound: float) -> mx.array:
        return mx.minimum(x, bound)

    def where(self, condition, a, b):
        return mx.where(condition, a, b)

    def take_last(self, x: mx.array, index: np.ndarray) -> mx.array:
        return mx.take_along_axis(x, mx.array(np.asarray(index, dtype=np.int32))[..., None], axis=-1)[..., 0]


def make_ops(device: str | None = None) -> MlxOps:
    """MlxOps on `device`: "cpu", "gpu", or None for MLX's default device.

    Raises:
        PissaError: for a device name MLX does not have, or a GPU that is not there.
    """
    if device is None:
        return MlxOps(mx.default_device())
    if device not in ("cpu", "gpu"):
        raise PissaError(f"unknown MLX device {device!r}; use cpu or gpu")
    if device == "gpu" and not mx.metal.is_available():
        raise PissaError("--device gpu asked for, but MLX sees no GPU (Metal) here; use --device cpu")
    return MlxOps(mx.cpu if device == "cpu" else mx.gpu)
