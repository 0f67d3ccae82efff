"""Which models both backends pack examples for exactly, read from a model folder's config.json.

A packed row holds several examples; it gives each the loss it has alone only where attention stays
inside each example and positions behave as they do alone. The architectures below are those both
backends have checked (tests/backend_torch/test_packing.py: transformers' block-diagonal masks from
position_ids; tests/backend_mlx/test_packing.py: pissa_mlx.packing's masks), one list for both, so a
run packs, or falls back to batches grouped by length, alike on torch and MLX. A rope scaling whose
frequencies depend on the sequence length (dynamic NTK, in transformers and mlx-lm alike) would
rotate a packed row's short examples otherwise than alone, so it is refused whatever the architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PACKABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2", "gemma3_text")
LENGTH_DEPENDENT_ROPE = ("dynamic",)


def unpackable_config(config: dict[str, Any]) -> str | None:
    """Why examples of a model with this config.json cannot be packed exactly, or None."""
    kind = config.get("model_type")
    if kind not in PACKABLE:
        return f"packing is checked for {', '.join(PACKABLE)} models, not {kind or 'this model'}"
    scalings = [config.get("rope_scaling") or {}, config.get("rope_parameters") or {}]
    for scaling in scalings:
        rope = scaling.get("type") or scaling.get("rope_type")
        if rope in LENGTH_DEPENDENT_ROPE:
            return f"its {rope} rope scaling depends on the sequence length, which packing changes"
    return None


def unpackable(model_dir: str | Path) -> str | None:
    """unpackable_config of a model folder's config.json (a reason when it has none or it is unreadable)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return f"{model_dir} has no config.json to tell its architecture"
    try:
        return unpackable_config(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        return f"cannot read the architecture in {path} ({e})"
