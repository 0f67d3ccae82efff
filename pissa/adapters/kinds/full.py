"""Full fine-tuning as a kind: every weight of the target linear layers trains, in place.

The baseline that "LoRA Learns Less and Forgets Less" (arXiv 2405.09673) measures adapters
against, run through the same init / train / checkpoint / resume / merge path as the adapters.
Its parameter is the weight itself ("weight" [out, in]); embeddings, norms and the output layer
stay frozen (targets as for the adapters: all-linear by default).

The init stores no parameter (EMPTY_INIT): a module starts from its base weight, so the init
folder holds the model and a pissa_init/ with the spec alone, not a second copy of the weights.
A trained "adapter" holds the trained weights; merging replaces the base weights with them, and
a finished run writes the whole model (RUN_DIR/model) instead of an adapter.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pissa.adapters.adapter import Start
from pissa.errors import PissaError
from pissa.numeric.dtypes import as_dtype, np_dtype

NAME = "full"
HELP = "full fine-tuning of the target weights"
LORA_SHAPED = False
OPTIONS: dict = {}
TENSORS = ("weight",)
KEY_SUFFIX: dict[str, str] = {}
MLX_LM = None  # mlx-lm has no layer for it
RECORDS_SHAPES = False
EMPTY_INIT = True
RANKED = False  # --rank and --alpha do not apply
OUTPUT = "model"
PEFT_KEYS: tuple[str, ...] = ()


def check(spec) -> None:
    """Rank and alpha do not apply; nor does dropout (there is no adapter input to drop)."""
    if spec.dropout:
        raise PissaError("full fine-tuning has no adapter whose input could be dropped out; use --dropout 0")


def scale(spec) -> float:
    return 1.0


def changes_base(spec) -> bool:
    return False


def shapes(spec, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    return (tuple(shape),)


def misfit(spec, shape: tuple[int, int]) -> str | None:
    return None


def inconsistent(spec, params: tuple[np.ndarray, ...]) -> str | None:
    return None if params[0].ndim == 2 else f"weight {params[0].shape} is not a matrix"


def init(Ws: Sequence[np.ndarray], names: Sequence[str], spec, ops) -> list[Start]:
    """No parameter is stored: the weights are the base weights (cast to the storage dtype)."""
    dtype = np_dtype(spec.dtype)
    return [Start((), as_dtype(W, dtype)) for W in Ws]


def merged(spec, params: tuple[np.ndarray, ...], W: np.ndarray) -> np.ndarray:
    """The trained weight replaces the base weight (float64 for a float64 W, else float32)."""
    return params[0].astype(np.float64 if W.dtype == np.float64 else np.float32)


def peft_fields(spec) -> dict[str, Any]:
    return {}


def from_peft(cfg: dict[str, Any]) -> dict[str, Any] | None:
    return None


def converts(spec) -> bool:
    return False


def to_lora(initial, trained):
    raise PissaError("full fine-tuning changes the weights themselves, which no LoRA holds; use the run's "
                     "RUN_DIR/model, or pissa merge MODEL_DIR --adapter ADAPTER --out MERGED")
