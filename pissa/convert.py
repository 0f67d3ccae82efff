"""Pure functions over adapters and name -> array dicts: PiSSA -> LoRA conversion and merging.

Conversion (REFERENCE.md section 2): training moves (A0, B0) to (A', B'), so the model is
W_res + s B'A' = W + s (B'A' - B0A0) = W + s [B' | -B0] @ [A' ; A0]: a plain rank-2r LoRA on
the ORIGINAL weights W, with the same scale s (alpha -> 2 alpha; rsLoRA alpha -> sqrt(2) alpha).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from pissa.errors import PissaError
from pissa.formats.peft import Adapter


class QuantizedBaseWarning(UserWarning):
    """The converted LoRA of a QPiSSA run is exact only on the unquantised base model."""


def quantized_base_note(initial: Adapter) -> str | None:
    """The caveat for a LoRA converted from a QPiSSA init, or None for a plain PiSSA init."""
    q = initial.info.get("quantization")
    if not q:
        return None
    return (f"this adapter was trained on a {q.get('scheme')}-quantised residual (QPiSSA); the converted LoRA "
            "reproduces the trained model exactly only on the unquantised original base, and on a quantised base "
            "it carries that base's quantisation error (PEFT says the same of its conversions)")


def pissa_to_lora(initial: Adapter, trained: Adapter) -> Adapter:
    """The rank-2r LoRA that turns the original model into the trained PiSSA model.

    Args:
        initial: the adapter pissa init wrote (DIR/pissa_init).
        trained: the same adapter after training.

    Raises:
        PissaError: when `trained` did not start from `initial` (different fingerprint, modules,
            ranks or scales).

    Warns:
        QuantizedBaseWarning: when `initial` is a QPiSSA init (see quantized_base_note).
    """
    start = trained.info.get("init_fingerprint")
    if initial.info.get("role") != "pissa_init":
        raise PissaError("--initial must be the pissa_init folder that pissa init wrote")
    if start is not None and start != initial.info.get("fingerprint"):
        raise PissaError("the trained adapter started from a different init than --initial "
                         f"(fingerprint {start} vs {initial.info.get('fingerprint')}); pass the pissa_init "
                         "folder of the model it was trained on")
    if set(initial.factors) != set(trained.factors):
        raise PissaError(f"--initial and --trained adapt different modules "
                         f"({len(initial.factors)} vs {len(trained.factors)}); they are not the same run")
    si, st = initial.spec, trained.spec
    if (si.rank, si.scale) != (st.rank, st.scale):
        raise PissaError(f"--initial has rank {si.rank} and scale {si.scale:g} but --trained has rank "
                         f"{st.rank} and scale {st.scale:g}; they are not the same run")
    note = quantized_base_note(initial)
    if note:
        warnings.warn(note, QuantizedBaseWarning, stacklevel=2)
    factors = {}
    for m, (A0, B0) in initial.factors.items():
        A1, B1 = trained.factors[m]
        dtype = A1.dtype
        A = np.concatenate([A1.astype(np.float32), A0.astype(np.float32)], axis=0)    # [2r, in]
        B = np.concatenate([B1.astype(np.float32), -B0.astype(np.float32)], axis=1)   # [out, 2r]
        factors[m] = (A.astype(dtype), B.astype(dtype))
    alpha = st.alpha * (math.sqrt(2) if st.use_rslora else 2)
    spec = dataclasses.replace(st, rank=2 * st.rank, alpha=alpha, init="lora")
    if not math.isclose(spec.scale, st.scale, rel_tol=1e-12):
        raise AssertionError("conversion must keep the scale")
    return Adapter(spec, factors, base_model=initial.info.get("source"),
                   info={"role": "lora", "converted_from": trained.info.get("init_fingerprint")})


def delta(adapter: Adapter, module: str) -> np.ndarray:
    """s * B @ A for one module, float32 [out, in]."""
    A, B = adapter.factors[module]
    return (B.astype(np.float32) @ A.astype(np.float32)) * np.float32(adapter.spec.scale)
