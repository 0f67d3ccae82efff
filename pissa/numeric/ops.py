"""The few array operations the decomposition needs, and the numpy reference implementation.

The math in pissa.numeric.decompose, pissa.numeric.qpissa and pissa.numeric.kl is written once
against this protocol. Besides these methods it uses only what numpy, torch and mlx arrays share:
`@`, `*`, `+`, `-`, `/`, comparisons and slicing. Arrays may carry leading batch axes ([b, m, n]):
backends that gain from batched SVDs get them.
Each backend implements Ops in its own package (pissa_torch.ops, pissa_mlx.ops) and keeps its
framework's quirks there, with a comment saying why. The Protocol below lists every member the core
uses (pissa.numeric.decompose, pissa.numeric.qpissa, pissa.jobs.init); NumpyOps is the reference for each contract.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol

import numpy as np

from pissa.numeric.dtypes import np_dtype

Array = Any


class Ops(Protocol):
    name: str
    svd_batch: int               # how many same-shape matrices pissa init stacks into one call
    quant_schemes: tuple[str, ...]  # the QPiSSA schemes quantize() accepts (pissa.numeric.quant)

    def scope(self, compute_dtype: str) -> ContextManager:
        """The context the decomposition's arithmetic runs in (MLX: float64 work on a CPU stream,
        since Metal has no float64; elsewhere nothing)."""

    def asarray(self, a: np.ndarray, dtype: str) -> Array:
        """A numpy array on the backend's device in "float64" or "float32"."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """Back to the host as numpy, same dtype."""

    def t(self, x: Array) -> Array:
        """Transpose of the last two axes."""

    def qr(self, x: Array) -> Array:
        """Q of the reduced QR of x [m, n], m >= n: Q is [m, n] with orthonormal columns."""

    def svd(self, x: Array) -> tuple[Array, Array, Array]:
        """Thin SVD of x [m, n]: U [m, k], S [k] (descending), Vt [k, n], k = min(m, n)."""

    def sqrt(self, x: Array) -> Array:
        ...

    def column_signs(self, u: Array) -> Array:
        """[k] of +1/-1: the sign of the largest-magnitude entry of each column (ties: the
        first such row; a zero column counts as +1)."""

    def round_to(self, x: Array, dtype: str) -> Array:
        """x rounded to a storage dtype ("float32", "bfloat16", "float16") and back to x's
        dtype. Always rounds through float32 first, so a float64 value meets the same double
        rounding on every backend."""

    def quantize(self, x: Array, scheme: Any, dtype: str = "float32") -> tuple[Any, Array]:
        """QPiSSA: (pissa.numeric.quant.QTensor on the host, bit-identical to pissa.numeric.quant's reference;
        deq(Q(x)) on the device in x's dtype) for x [out, in] holding values of a weight stored in
        `dtype` (quantised from that dtype, as the library quantises such a weight). May raise
        ValueError for a scheme not in quant_schemes."""

    def svdvals(self, x: Array) -> Array:
        """Singular values of x [m, n], descending, in x's dtype."""

    # The elementwise and last-axis operations of the stable KL (pissa.numeric.kl), on the
    # backend's float32 logits [.., vocab].
    def log_softmax(self, x: Array) -> Array:
        """log softmax over the last axis."""

    def exp(self, x: Array) -> Array:
        ...

    def expm1(self, x: Array) -> Array:
        ...

    def log1p(self, x: Array) -> Array:
        ...

    def sum_last(self, x: Array, keepdims: bool = False) -> Array:
        """Sum over the last axis."""

    def max_last(self, x: Array) -> Array:
        """Maximum over the last axis."""

    def minimum(self, x: Array, bound: float) -> Array:
        ...

    def where(self, condition: Array, a: Array, b: Array) -> Array:
        ...

    def take_last(self, x: Array, index: np.ndarray) -> Array:
        """x[..., index[...]]: one entry of the last axis per position, index a host integer
        array of x's leading shape."""


class NumpyOps:
    """The reference backend: numpy's LAPACK on the CPU."""

    name = "numpy"
    svd_batch = 1
    quant_schemes = ("nf4", "int8", "affine4")

    def scope(self, compute_dtype: str):
        return contextlib.nullcontext()

    def asarray(self, a: np.ndarray, dtype: str) -> np.ndarray:
        return np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def t(self, x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, -1, -2)

    def qr(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.qr(x, mode="reduced")[0]

    def svd(self, x: np.ndarray):
        return np.linalg.svd(x, full_matrices=False)

    def sqrt(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(x)

    def column_signs(self, u: np.ndarray) -> np.ndarray:
        idx = np.argmax(np.abs(u), axis=-2)[..., None, :]
        signs = np.sign(np.take_along_axis(u, idx, axis=-2))[..., 0, :]
        return np.where(signs == 0, 1, signs).astype(u.dtype)

    def round_to(self, x: np.ndarray, dtype: str) -> np.ndarray:
        return x.astype(np.float32).astype(np_dtype(dtype)).astype(x.dtype)

    def quantize(self, x: np.ndarray, scheme, dtype: str = "float32"):
        """Quantise x [out, in] (compute dtype, values of the storage dtype `dtype`).

        Returns (QTensor with codes and scales on the host, bit-identical to pissa.numeric.quant's
        reference; deq(Q(x)) on the device in x's dtype).
        """
        from pissa.numeric import quant

        q = quant.quantize(np.asarray(x, dtype=np.float32), scheme, dtype)
        return q, quant.dequantize(q).astype(x.dtype)

    def svdvals(self, x: np.ndarray) -> np.ndarray:
        """Singular values of x [m, n] (descending), in x's dtype."""
        return np.linalg.svd(x, compute_uv=False)

    def log_softmax(self, x: np.ndarray) -> np.ndarray:
        top = x.max(axis=-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))

    exp, expm1, log1p = staticmethod(np.exp), staticmethod(np.expm1), staticmethod(np.log1p)

    def sum_last(self, x: np.ndarray, keepdims: bool = False) -> np.ndarray:
        return x.sum(axis=-1, keepdims=keepdims)

    def max_last(self, x: np.ndarray) -> np.ndarray:
        return x.max(axis=-1)

    def minimum(self, x: np.ndarray, bound: float) -> np.ndarray:
        return np.minimum(x, bound)

    def where(self, condition, a, b):
        return np.where(condition, a, b)

    def take_last(self, x: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, np.asarray(index)[..., None], axis=-1)[..., 0]


def available_backends() -> list[str]:
    """Backends whose framework and pissa package are both installed (numpy always is)."""
    import importlib.util

    found = ["numpy"]
    for name, framework in (("torch", "torch"), ("mlx", "mlx.core")):
        try:
            if importlib.util.find_spec(framework) and importlib.util.find_spec(f"pissa_{name}.ops"):
                found.append(name)
        except ImportError:
            pass
    return found


def get_ops(backend: str, device: str | None = None) -> Ops:
    """The Ops of a backend by name: "numpy", "torch" or "mlx".

    Raises:
        PissaError: for an unknown name, or a backend whose framework is not installed.
    """
    from pissa.errors import PissaError

    if backend == "numpy":
        if device not in (None, "cpu"):
            raise PissaError(f"the numpy backend runs on the cpu only, not {device!r}; drop --device")
        return NumpyOps()
    if backend in ("torch", "mlx"):
        try:
            module = __import__(f"pissa_{backend}.ops", fromlist=["make_ops"])
        except ImportError as e:
            raise PissaError(f"the {backend} backend is not available ({e}); "
                             f"install it with: pip install 'pissa[{backend}]'") from None
        return module.make_ops(device)
    raise PissaError(f"unknown backend {backend!r}; choose numpy, torch or mlx")
