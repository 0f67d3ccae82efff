"""`pissa convert` and the merged update, for every adapter kind: each kind (pissa.kinds) says
what its exact LoRA is and what its dense update is; this module only dispatches on the kind.
"""

from __future__ import annotations

import numpy as np

from pissa.formats.peft import Adapter
from pissa.kinds.lora import QuantizedBaseWarning, quantized_base_note  # noqa: F401  (public names)
from pissa.kinds.lora import to_lora as pissa_to_lora  # noqa: F401  (PiSSA -> rank-2r LoRA)


def to_lora(initial: Adapter | None, trained: Adapter) -> Adapter:
    """The plain LoRA that turns the model the adapter was initialised from into the trained model.

    Args:
        initial: the pissa_init adapter (PiSSA and LoRA need it; MoRA starts at zero and does not).
        trained: the trained adapter.

    Raises:
        PissaError: when the kind has no exact LoRA form (rotation MoRA), or `initial` does not
            match `trained`.
    """
    return trained.spec.kind_module.to_lora(initial, trained)


def delta(adapter: Adapter, module: str, shape: tuple[int, int]) -> np.ndarray:
    """The module's dense update dW [out, in] in float32, for merging into a weight of `shape`."""
    return adapter.spec.kind_module.delta(adapter.spec, adapter.factors[module], tuple(shape), np.float32)
