"""DoRA (arXiv 2402.09353; PEFT's `use_dora=True`, mlx-lm's `fine_tune_type: dora`): LoRA's pair
A [r, in], B [out, r] plus a trained magnitude m [out], one per output row:

    W' = m * V / ||V||,   V = W + s B A,   the norm per output row (over the input dimension).

m starts at ||V|| of the init (so step 0 reproduces the model), for any LoRA-shaped init: with
PiSSA's, W is the residual W_res and V = W_res + s B A = W, so m = ||W||. PEFT and mlx-lm treat
||V|| as a constant in the backward pass (the paper's section 4.3), and so do our layers; PEFT's
forward is y = base(x) + (m/||V|| - 1) (base(x) - bias) + (m/||V||) s B A x.

The update is not linear in A and B (the magnitude rescales every row), so no plain LoRA holds it:
a trained DoRA adapter runs as it is (PEFT, mlx-lm: RUN_DIR/adapter carries both formats) or is
merged into the model. File layout (PEFT 0.21's): "base_model.model.<module>.lora_magnitude_vector"
[out], without ".weight", beside lora_A / lora_B; adapter_config.json says "use_dora": true.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pissa.adapters.adapter import Start
from pissa.adapters.kinds import lora
from pissa.errors import PissaError
from pissa.numeric.dtypes import np_dtype
from pissa.numeric.decompose import stored

NAME = "dora"
HELP = "LoRA's A and B with a trained magnitude per output row"
LORA_SHAPED = True
OPTIONS: dict = {}
TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")
KEY_SUFFIX = {"lora_magnitude_vector": ""}   # PEFT's key has no ".weight"
RECORDS_SHAPES = False
EMPTY_INIT = False
RANKED = True
OUTPUT = "adapter"
PEFT_KEYS = ("use_dora",)
# mlx-lm's form of this kind (pissa.files.formats.mlx_lm): its fine_tune_type and its name for each
# of our tensors (mlx_lm/tuner/dora.py DoRALinear: lora_a [in, r], lora_b [r, out], m [out]).
MLX_LM = ("dora", {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"})

check, scale, changes_base, misfit = lora.check, lora.scale, lora.changes_base, lora.misfit


def shapes(spec, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    return (*lora.shapes(spec, shape), (shape[0],))


def inconsistent(spec, params: tuple[np.ndarray, ...]) -> str | None:
    A, B, m = params
    why = lora.inconsistent(spec, (A, B))
    if why is None and m.shape != (B.shape[0],):
        why = f"magnitude {m.shape} does not fit B {B.shape} (one entry per output row)"
    return why


def row_norms(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float, dtype=np.float64) -> np.ndarray:
    """||W + s B @ A|| per output row [out], computed in `dtype`."""
    V = W.astype(dtype) + (B.astype(dtype) @ A.astype(dtype)) * dtype(s)
    return np.linalg.norm(V, axis=1)


def init(Ws: Sequence[np.ndarray], names: Sequence[str], spec, ops) -> list[Start]:
    """The LoRA-shaped init (pissa.adapters.inits) of each weight, and m = ||base + s B A|| per row,
    computed in float64 from the values as stored (base, A, B), then stored in spec.dtype."""
    out = np_dtype(spec.dtype)
    starts = []
    for start in lora.init(Ws, names, spec, ops):
        A, B = start.params
        m = stored(row_norms(start.base, A, B, spec.scale).astype(np.float32), out)
        starts.append(Start((A, B, m), start.base, start.spectrum))
    return starts


def merged(spec, params: tuple[np.ndarray, ...], W: np.ndarray) -> np.ndarray:
    """m / ||V|| * V with V = W + s B A, the ratio per row: in float64 for a float64 W (the oracle),
    else in float32 (what `pissa merge` writes)."""
    A, B, m = params
    dtype = np.float64 if W.dtype == np.float64 else np.float32
    V = W.astype(dtype) + (B.astype(dtype) @ A.astype(dtype)) * dtype(scale(spec))
    return (m.astype(dtype) / np.linalg.norm(V, axis=1))[:, None] * V


def peft_fields(spec) -> dict[str, Any]:
    return {"use_dora": True}


def from_peft(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """{"kind": "dora"} for a PEFT config with use_dora, None otherwise."""
    return {"kind": NAME} if cfg.get("use_dora") else None


def converts(spec) -> bool:
    return False


def to_lora(initial, trained):
    raise PissaError("no plain LoRA holds a DoRA update (its magnitude rescales every row of the weight); merge it "
                     "into the model instead: pissa merge MODEL_DIR --adapter ADAPTER --out MERGED")
