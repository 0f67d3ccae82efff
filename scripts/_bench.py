"""What every scripts/bench_*.py prints first: the threading environment it ran under, so that a
change in it (OpenMP's wait policy, a preloaded BLAS, thread counts) shows up next to the figures."""

from __future__ import annotations

import os
import platform

VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "LD_PRELOAD")


def threading_environment() -> str:
    """One line: CPU count, the threading variables (unset ones say so) and torch's thread count."""
    parts = [f"cpus={os.cpu_count()}", f"machine={platform.machine()}"]
    parts += [f"{v}={os.environ.get(v, '(unset)')}" for v in VARIABLES]
    try:
        import torch

        parts.append(f"torch_threads={torch.get_num_threads()}")
    except ImportError:
        pass
    return "threading: " + " ".join(parts)
