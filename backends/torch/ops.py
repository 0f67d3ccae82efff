"""pissa.numeric.ops.Ops for PyTorch: the decomposition on a CPU or CUDA device."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from pissa.errors import PissaError

_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchOps:
    """Ops on one torch device.

    svd_batch: how many same-shape matrices pissa init stacks into one SVD call. 1 on the CPU:
    measured there (float64, 8 x 576x576, 2 cores), batched 0.80 s against a loop's 0.79 s.
    On CUDA it is also 1 until scripts/bench_torch.py measures a gain (`--svd-batch` overrides).
    """

    name = "torch"
    # nf4 through bitsandbytes, the affine schemes in plain torch (pissa_torch.quant).
    quant_schemes = ("nf4", "int8", "affine4")

    def __init__(self, device: torch.device):
        self.device = device
        self.svd_batch = 1

    def scope(self, compute_dtype: str):
        """One thread for the decomposition on the CPU under OMP_WAIT_POLICY=PASSIVE (which
        scripts/env.sh sets, so that two jobs on the same cores do not spin against each other).
        Why: with sleeping threads, LAPACK's SVD, made of many small BLAS calls, wakes them at
        every call. Measured here: one 1536x576 float32 SVD 0.38 s on 2 threads against 0.066 s
        on one; the full-SVD init of SmolLM2 55 s against 14 s (docs/benchmarks.md). Elsewhere
        (spinning threads, a GPU) nothing changes."""
        if self.device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            return _one_thread()
        return contextlib.nullcontext()

    def asarray(self, a: np.ndarray, dtype: str) -> torch.Tensor:
        # Convert on the host first: torch.from_numpy shares memory, and .to() then copies once.
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64 if dtype == "float64" else np.float32)
                                ).to(self.device)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def t(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2)

    def qr(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(x, mode="reduced")[0]

    def svd(self, x: torch.Tensor):
        # CUDA: the default driver picks gesvdj for small matrices and gesvd otherwise; both
        # return the thin factors we ask for.
        return torch.linalg.svd(x, full_matrices=False)

    def sqrt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)

    def column_signs(self, u: torch.Tensor) -> torch.Tensor:
        idx = u.abs().argmax(dim=-2, keepdim=True)
        signs = torch.sign(torch.take_along_dim(u, idx, dim=-2)).squeeze(-2)
        return torch.where(signs == 0, torch.ones_like(signs), signs)

    def round_to(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        return x.to(torch.float32).to(_STORAGE[dtype]).to(x.dtype)

    def quantize(self, x: torch.Tensor, scheme, dtype: str = "float32"):
        """(QTensor on the host, bit-identical to pissa.numeric.quant; deq(Q(x)) on x's device in x's
        dtype), quantised from the storage dtype `dtype`. See pissa_torch.quant."""
        from pissa_torch.quant import quantize

        return quantize(x, scheme, dtype)

    def svdvals(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, dim=-1)

    exp, expm1, log1p = staticmethod(torch.exp), staticmethod(torch.expm1), staticmethod(torch.log1p)

    def sum_last(self, x: torch.Tensor, keepdims: bool = False) -> torch.Tensor:
        return x.sum(dim=-1, keepdim=keepdims)

    def max_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=-1)

    def minimum(self, x: torch.Tensor, bound: float) -> torch.Tensor:
        return x.clamp(max=bound)

    def where(self, condition, a, b):
        return torch.where(condition, a, b)

    def take_last(self, x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)).to(x.device)
        return torch.gather(x, -1, idx[..., None])[..., 0]


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_ops(device: str | None = None) -> TorchOps:
    """TorchOps on `device` (default: cuda when available, else cpu).

    Raises:
        PissaError: for a device torch cannot use.
    """
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise PissaError(f"unknown torch device {name!r} ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PissaError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if dev.type == "mps":
        # Apple's MPS has no float64 and no linalg.svd; the MLX backend is the one for Macs.
        raise PissaError("torch on mps cannot run the SVD; use --backend mlx on a Mac, or --device cpu")
    return TorchOps(dev)
