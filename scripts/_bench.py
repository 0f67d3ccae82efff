"""What every scripts/bench_*.py prints first: the threading environment it ran under, so that a
change in it (OpenMP's wait policy, a preloaded BLAS, thread counts) shows up next to the figures."""

from __future__ import annotations

import os
import platform
import sys
import time

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


def measured(fn, interval: float = 0.005) -> dict:
    """fn()'s result (a dict, or None) with this process's peaks: resident (ru_maxrss) and anonymous
    (sampled every `interval` s), the anonymous memory before fn ran (the baseline: interpreter,
    libraries) and the seconds it took; where fn used a CUDA GPU, that device's peak too (torch's
    max_memory_allocated: tensors only, not the allocator's cache). The benchmarks run each measured
    thing in a child of its own, so each peak is that thing's alone."""
    from pissa.memory import AnonPeak, anon_mib, peak_rss_mib

    base = anon_mib()
    t = time.perf_counter()
    with AnonPeak(interval) as anon:
        out = fn() or {}
    out = {**out, "seconds": round(time.perf_counter() - t, 1), "rss_peak_mib": round(peak_rss_mib()),
           "anon_peak_mib": round(anon.mib) if anon.mib is not None else None,
           "anon_base_mib": round(base) if base is not None else None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        out["cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20)
    return out
