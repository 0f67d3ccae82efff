"""The rank of a fine-tuning's weight change ("LoRA Learns Less and Forgets Less", section 4.5):
for dW = W_trained - W_base, the number of singular values that explain 90% of its variance
(sum of sigma_i^2), per module type. The paper finds full fine-tuning's dW 10-100x the rank of
typical LoRA ranks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pissa.files.formats.peft import load_adapter
from pissa.files.loaders import open_model
from pissa.numeric.ops import NumpyOps

_TYPE = re.compile(r"(?:^|\.)layers\.\d+\.(.+)$")


def rank_for(singular_values: np.ndarray, share: float = 0.9) -> int:
    """The smallest k with sum(s[:k]^2) >= share * sum(s^2) (0 for a zero matrix)."""
    energy = np.cumsum(np.asarray(singular_values, dtype=np.float64) ** 2)
    if energy[-1] <= 0:
        return 0
    return int(np.searchsorted(energy, share * energy[-1] * (1 - 1e-12)) + 1)


def module_type(module: str) -> str:
    m = _TYPE.search(module)
    return m.group(1) if m else module


def weight_change_ranks(base_dir: Path, init_dir: Path, adapter_dir: Path, share: float = 0.9) -> dict[str, dict]:
    """Per module type: the median and range over layers of the rank that explains `share` of
    dW's variance, with dW = the adapted weight (the init folder's weight with the adapter merged
    by its kind) minus the base model's weight, in float64 on the core's numpy SVD."""
    adapter = load_adapter(adapter_dir)
    kind, base, init = adapter.spec.kind_module, open_model(str(base_dir)), open_model(str(init_dir))
    ops = NumpyOps()
    ranks: dict[str, list[int]] = {}
    for module, params in adapter.factors.items():
        W = base.get(module + ".weight").astype(np.float64)
        trained = kind.merged(adapter.spec.for_module(module), params, init.get(module + ".weight")).astype(np.float64)
        s = ops.svdvals(trained - W)
        ranks.setdefault(module_type(module), []).append(rank_for(s, share))
    return {t: {"median": float(np.median(r)), "min": int(min(r)), "max": int(max(r)), "layers": len(r)}
            for t, r in ranks.items()}
