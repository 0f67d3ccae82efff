"""Storage and compute dtypes by name, as numpy dtypes (bfloat16 from ml_dtypes: numpy has none).

The storage dtypes are what model and adapter files hold; the compute dtypes what the
decomposition runs in (float64 makes every backend agree; float32 is the fast path).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

STORAGE_DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("float64", "float32")
STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float64": np.dtype("<f8")}


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a storage or compute dtype name ("float32", "bfloat16", "float16", "float64")."""
    return STORAGE[name]


def as_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x in a storage dtype: x itself when it is stored so already (a memory map stays one: nothing
    is copied), else its cast through float32, as every cast in pissa goes."""
    dtype = np.dtype(dtype)
    return x if x.dtype == dtype else x.astype(np.float32).astype(dtype)
