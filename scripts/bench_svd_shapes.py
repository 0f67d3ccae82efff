"""Per-shape init timings behind docs/scaling.md: one `pissa init` decomposition (pissa.numeric.decompose,
numpy backend: the SVD, sign canonicalisation, factor split and residual) for every distinct
target shape of Llama-3-8B, Llama-3-70B and Qwen2.5-32B, on this machine's CPU.

    python scripts/bench_svd_shapes.py [--full-max-k 4096] [--out scaling.json]

- pissa-fast (randomised SVD, r 16, oversampling 8, niter 4): every shape, float32 and float64.
- pissa (full SVD): float32 for shapes with min(m, n) <= --full-max-k, float64 up to half that;
  the larger ones would take tens of minutes each on 2 cores, so they are extrapolated from a
  fit t = a m n k + b k^3 (k = min(m, n): LAPACK's bidiagonalisation and vector work) to the
  measured shapes plus a few smaller ones, and marked as extrapolated.
- copy: reading a tensor and casting it (what a non-target tensor costs), per element.
Random Gaussian matrices: the time does not depend on the spectrum. It prints the machine's
threading environment and its load average before and after, since other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import threading_environment  # noqa: E402

from pissa.adapters.inits import decompose  # noqa: E402
from pissa.numeric.ops import NumpyOps  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402

# (hidden, intermediate, layers, attention heads, KV heads, head dim, vocab), from each model's config.json
MODELS = {
    "Llama-3-8B": (4096, 14336, 32, 32, 8, 128, 128256),
    "Llama-3-70B": (8192, 28672, 80, 64, 8, 128, 128256),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 128, 152064),
}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXTRA = [(512, 512), (1024, 1024), (2048, 2048), (1024, 3072), (3072, 1024), (2048, 6144)]  # for the fit


def target_shapes(model: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each of the seven target kinds of one block."""
    hidden, inter, _, heads, kv, hd, _ = MODELS[model]
    return {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
            "o_proj": (hidden, heads * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def timed(shape: tuple[int, int], spec: AdapterSpec, repeat: int = 1) -> float:
    W = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    ops = NumpyOps()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        decompose(W, "model.layers.0.mlp.up_proj", spec, ops)
        best = min(best, time.perf_counter() - t)
    return best


def copy_seconds_per_element() -> float:
    W = np.random.default_rng(0).standard_normal((8192, 8192), dtype=np.float32)
    t = time.perf_counter()
    for _ in range(3):
        np.ascontiguousarray(W.astype(np.float32)).tobytes()
    return (time.perf_counter() - t) / 3 / W.size


def fit(points: list[tuple[tuple[int, int], float]]) -> tuple[float, float]:
    """Least squares, relative: t = a m n k + b k^3."""
    X = np.array([[m * n * min(m, n), min(m, n) ** 3] for (m, n), _ in points], dtype=np.float64)
    t = np.array([s for _, s in points])
    coef, *_ = np.linalg.lstsq(X / t[:, None], np.ones(len(t)), rcond=None)
    return float(coef[0]), float(coef[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full-max-k", type=int, default=4096, help="largest min(m, n) to time a float32 full SVD at")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    print(threading_environment())
    print(f"load average at start: {os.getloadavg()}")
    shapes = sorted({s for model in MODELS for s in target_shapes(model).values()})
    result: dict = {"load_start": os.getloadavg(), "fast": {}, "full": {}, "copy_s_per_element": 0.0}
    result["copy_s_per_element"] = copy_seconds_per_element()
    print(f"copy: {result['copy_s_per_element'] * 1e9:.2f} ns per element")
    for dtype in ("float32", "float64"):
        spec = AdapterSpec(rank=16, init="pissa-fast", niter=4, oversampling=8, compute_dtype=dtype)
        for shape in shapes:
            s = timed(shape, spec, repeat=2)
            result["fast"][f"{dtype} {shape[0]}x{shape[1]}"] = s
            print(f"pissa-fast {dtype} {shape[0]:>6} x {shape[1]:<6} {s:8.3f} s", flush=True)
    for dtype, max_k in (("float32", args.full_max_k), ("float64", args.full_max_k // 2)):
        spec = AdapterSpec(rank=16, init="pissa", compute_dtype=dtype)
        points = []
        for shape in sorted(EXTRA + shapes, key=lambda s: s[0] * s[1] * min(s)):
            if min(shape) > max_k:
                continue
            s = timed(shape, spec)
            points.append((shape, s))
            result["full"][f"{dtype} {shape[0]}x{shape[1]}"] = {"seconds": s, "measured": True}
            print(f"pissa      {dtype} {shape[0]:>6} x {shape[1]:<6} {s:8.2f} s", flush=True)
        a, b = fit(points)
        result["full"][f"{dtype} fit"] = {"a": a, "b": b}
        for shape in shapes:
            if min(shape) > max_k:
                m, n = shape
                s = a * m * n * min(m, n) + b * min(m, n) ** 3
                result["full"][f"{dtype} {m}x{n}"] = {"seconds": s, "measured": False}
                print(f"pissa      {dtype} {m:>6} x {n:<6} {s:8.1f} s (extrapolated)", flush=True)
        worst = max(abs(a * m * n * min(m, n) + b * min(m, n) ** 3 - s) / s for (m, n), s in points)
        result["full"][f"{dtype} fit"]["worst_relative_error"] = worst
        print(f"full-SVD fit {dtype}: t = {a:.3e} m n k + {b:.3e} k^3; worst relative error on the measured "
              f"shapes {worst:.0%}")
    result["load_end"] = os.getloadavg()
    print(f"load average at end: {result['load_end']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
