"""MoRA (arXiv 2405.12130): one trainable square matrix M [r_hat, r_hat] per weight, between a fixed
compression of the input and a fixed decompression to the output. r_hat = int(sqrt((in + out) r)
+ 0.5) (made even for `rotation`), so M has about the parameters of a rank-r LoRA, but its update
can have rank r_hat (sharing) or full rank (rotation). M starts at zero; the scale is 1.

With L = ceil(in / r_hat) r_hat, x is first padded to length L by wrapping (x_pad[j] = x[j mod in]):
- sharing (the paper's type 1, eq. 6): z = the sum of the L / r_hat groups of x_pad, y = M z, and the
  output tiles y and truncates it to `out`. dW = D M C with C [r_hat, in], D [out, r_hat]; its rank
  is at most r_hat, so it is exactly a LoRA (B = D, A = M C, scale 1).
- rotation (type 6, eq. 9): x_pad is cut into blocks of r_hat; block b is rotated RoPE-style by the
  angles b theta_j, theta_j = 10000^(-2j / r_hat) (rotate_half layout), and mapped by the same M.
  The L outputs are then folded onto `out`: tiled and truncated when L <= out, and, when L > out,
  summed modulo out. dW = T blockdiag(M R_b) P: full rank in general.

Two defects of the public code (kongds/MoRA, peft-mora/src/peft/tuners/lora/layer.py) are fixed
here. For rotation with L > out it truncates the L outputs to `out`, so the inputs of the blocks
past `out` never reach dW (886 of SmolLM2-135M's 1536 down_proj inputs at r = 8); we sum the
blocks past `out` onto the first ones instead. And its rotation merge fails when in <= r_hat;
ours is the dense product below, defined for every shape, as is the wrap padding when
in < r_hat (the public forward pads with x[:pad], which is too short then).

File layout (the public code's): M is stored as "lora_A" ([r_hat, r_hat]), and adapter_config.json
carries "use_mora": true and "mora_type": 1 (sharing) or 6 (rotation) beside PEFT's fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from pissa.adapters.adapter import BASE_MODEL_INFO, Start
from pissa.adapters.kinds import Option
from pissa.errors import PissaError
from pissa.numeric.dtypes import as_dtype, np_dtype

NAME = "mora"
HELP = "MoRA's square M"
LORA_SHAPED = False
TYPES = {"sharing": 1, "rotation": 6}   # our names -> the public code's mora_type numbers
OPTIONS = {"mora_type": Option("sharing", tuple(TYPES),
                               "with --kind mora: sharing (the paper's type 1; converts to a LoRA) or rotation "
                               "(type 6)")}
TENSORS = ("lora_A",)
KEY_SUFFIX: dict[str, str] = {}
MLX_LM = None  # mlx-lm has no layer for it
RECORDS_SHAPES = True  # pissa_config.json "shapes": [out, in] of each module
EMPTY_INIT = False
RANKED = True   # its shapes follow --rank
OUTPUT = "adapter"
PEFT_KEYS = ("use_mora", "mora_type")
ROPE_BASE = 10000.0


def check(spec) -> None:
    """The options are checked against OPTIONS by the spec."""


def type_of(spec) -> str:
    """"sharing" or "rotation"."""
    return spec.option("mora_type")


def scale(spec) -> float:
    return 1.0


def changes_base(spec) -> bool:
    return False


def r_hat(rank: int, shape: tuple[int, int], mora_type: str) -> int:
    """The side of M for a weight [out, in]: int(sqrt((in + out) r) + 0.5), even for rotation."""
    n = int(math.sqrt((shape[0] + shape[1]) * rank) + 0.5)
    return n // 2 * 2 if mora_type == "rotation" else n


def shapes(spec, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    n = r_hat(spec.rank, shape, type_of(spec))
    return ((n, n),)


def misfit(spec, shape: tuple[int, int]) -> str | None:
    if r_hat(spec.rank, shape, type_of(spec)) < 2:
        return f"MoRA's r_hat is below 2 at rank {spec.rank}"
    return None


def wrong_shape(spec, weight: tuple[int, int], m: tuple[int, ...]) -> str | None:
    """Why an M of shape `m` cannot be this spec's M for a weight of shape `weight`, or None."""
    want = shapes(spec, weight)[0]
    if tuple(m) != tuple(want):
        return f"M {tuple(m)} does not fit a weight {tuple(weight)} at rank {spec.rank} ({type_of(spec)}: {want})"
    return None


def inconsistent(spec, params: tuple[np.ndarray, ...]) -> str | None:
    (M,) = params
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        return f"M {M.shape} is not square"
    return None


def init(Ws: Sequence[np.ndarray], names: Sequence[str], spec, ops) -> list[Start]:
    """M = 0; the base weights are stored unchanged (cast to the storage dtype)."""
    dtype = np_dtype(spec.dtype)
    return [Start((np.zeros(shapes(spec, W.shape)[0], dtype),), as_dtype(W, dtype)) for W in Ws]


# ---------------------------------------------------------------------- the fixed maps
def padded_length(n_in: int, n: int) -> int:
    """L: the input length after wrap padding, the next multiple of r_hat."""
    return -(-n_in // n) * n


def rotation_tables(blocks: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [blocks, n] (float64): block b, position i turns by b * theta_(i mod n/2)."""
    theta = ROPE_BASE ** (-np.arange(0, n, 2, dtype=np.float64) / n)    # [n / 2]
    angles = np.outer(np.arange(blocks, dtype=np.float64), np.concatenate([theta, theta]))
    return np.cos(angles), np.sin(angles)


def wrap_matrix(rows: int, cols: int) -> np.ndarray:
    """[rows, cols], entry (j, i) = 1 when j mod cols == i: repeats a length-`cols` vector
    cyclically to length `rows` (wrap padding, or tiling)."""
    return (np.arange(rows)[:, None] % cols == np.arange(cols)[None, :]).astype(np.float64)


def fold_matrix(n_out: int, length: int) -> np.ndarray:
    """T [out, L] of rotation: entry (k, j) = 1 when k and j agree modulo min(L, out); that tiles
    (and truncates) when L <= out, and sums the outputs past `out` onto the first ones when L > out."""
    m = min(length, n_out)
    return (np.arange(n_out)[:, None] % m == np.arange(length)[None, :] % m).astype(np.float64)


def rotation(n: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """R [n, n] with R z = z * cos + rotate_half(z) * sin, rotate_half(z) = [-z[n/2:], z[:n/2]]."""
    h = n // 2
    H = np.zeros((n, n))
    H[np.arange(h), np.arange(h) + h] = -1.0
    H[np.arange(h) + h, np.arange(h)] = 1.0
    return np.diag(cos) + sin[:, None] * H


def delta(spec, params: tuple[np.ndarray, ...], shape: tuple[int, int], dtype=np.float64) -> np.ndarray:
    """dW [out, in] as an explicit product of dense matrices (the oracle the forwards are tested
    against; O(L^2) memory, fine for merging one matrix at a time)."""
    (M,) = params
    n_out, n_in = shape
    n = M.shape[0]
    if M.shape != shapes(spec, shape)[0]:
        raise PissaError(f"MoRA M {M.shape} does not fit a weight {shape} at rank {spec.rank} "
                         f"({type_of(spec)}: r_hat {shapes(spec, shape)[0][0]})")
    M = M.astype(np.float64)
    L = padded_length(n_in, n)
    P = wrap_matrix(L, n_in)                                            # x_pad = P x
    if type_of(spec) == "sharing":
        C = wrap_matrix(L, n).T @ P                                     # [n, in]: group sums
        D = wrap_matrix(n_out, n)                                       # [out, n]: tile, truncate
        dW = D @ M @ C
    else:
        cos, sin = rotation_tables(L // n, n)
        mix = np.zeros((L, L))
        for b in range(L // n):
            mix[b * n:(b + 1) * n, b * n:(b + 1) * n] = M @ rotation(n, cos[b], sin[b])
        dW = fold_matrix(n_out, L) @ mix @ P
    return dW.astype(dtype)


# ---------------------------------------------------------------------- files and conversion
def merged(spec, params: tuple[np.ndarray, ...], W: np.ndarray) -> np.ndarray:
    """W + dW, in float64 for a float64 W (the oracle), else in float32 (what `pissa merge` has
    always computed)."""
    dtype = np.float64 if W.dtype == np.float64 else np.float32
    return W.astype(dtype) + delta(spec, params, W.shape, dtype)


def peft_fields(spec) -> dict[str, Any]:
    return {"use_mora": True, "mora_type": TYPES[type_of(spec)]}


def from_peft(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Spec fields for a MoRA adapter_config.json, or None when it is not MoRA."""
    if not cfg.get("use_mora"):
        return None
    names = {v: k for k, v in TYPES.items()}
    if cfg.get("mora_type", 1) not in names:
        raise PissaError(f"MoRA type {cfg.get('mora_type')!r} is not supported; pissa trains types 1 (sharing) "
                         "and 6 (rotation)")
    return {"kind": NAME, "mora_type": names[cfg.get("mora_type", 1)]}


def lora_factors(spec, M: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """sharing: (A = M C [r_hat, in], B = D [out, r_hat]) with B @ A = dW exactly, in float64."""
    n_out, n_in = shape
    n = M.shape[0]
    L = padded_length(n_in, n)
    C = wrap_matrix(L, n).T @ wrap_matrix(L, n_in)
    return M.astype(np.float64) @ C, wrap_matrix(n_out, n)


def converts(spec) -> bool:
    """Only sharing has a low-rank update."""
    return type_of(spec) == "sharing"


def to_lora(initial, trained):
    """sharing: the plain LoRA with B = D and A = M C (scale 1), every module padded with zero
    rows/columns to the largest r_hat, so that one rank fits all (PEFT, vLLM and mlx-lm read a
    single rank); zero rows add nothing. M starts at zero, so the LoRA applies to the model the
    adapter was trained on, whose weights are the original ones. `initial` is not needed.

    Raises:
        PissaError: for rotation, whose update has full rank; or a module whose in/out shape is
            not recorded.
    """
    spec = trained.spec
    if type_of(spec) != "sharing":
        raise PissaError("a rotation MoRA adapter has a full-rank update, which no LoRA can hold; merge it "
                         "into the model instead: pissa merge MODEL_DIR --adapter ADAPTER --out MERGED")
    shapes_of = trained.info.get("shapes") or {}
    missing = sorted(m for m in trained.factors if m not in shapes_of)
    if missing:
        raise PissaError(f"the MoRA adapter does not record the weight shape of {missing[0]}; it was not written "
                         "by pissa (pissa_config.json lacks 'shapes')")
    parts = {m: lora_factors(spec, M, tuple(shapes_of[m])) for m, (M,) in trained.factors.items()}
    rank = max(A.shape[0] for A, _ in parts.values())
    dtype = next(iter(trained.factors.values()))[0].dtype
    factors = {}
    for m, (A, B) in parts.items():
        A = np.concatenate([A, np.zeros((rank - A.shape[0], A.shape[1]))], axis=0)
        B = np.concatenate([B, np.zeros((B.shape[0], rank - B.shape[1]))], axis=1)
        factors[m] = (A.astype(np.float32).astype(dtype), B.astype(np.float32).astype(dtype))
    lora = dataclasses.replace(spec, rank=rank, alpha=float(rank), use_rslora=False, targets=tuple(sorted(factors)),
                               kind="lora", init="lora", options={})
    return type(trained)(lora, factors, base_model=trained.info.get("source") or trained.base_model,
                         info={"role": "lora", "converted_from": "mora-sharing",
                               **{k: trained.info[k] for k in BASE_MODEL_INFO if k in trained.info}})
