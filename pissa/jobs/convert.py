"""`pissa convert`, for every adapter kind: each kind (pissa.adapters.kinds) says what its exact
LoRA is, or why it has none; this module only dispatches on the kind.
"""

from __future__ import annotations

from pissa.adapters.adapter import Adapter
from pissa.adapters.kinds.lora import QuantizedBaseWarning, quantized_base_note  # noqa: F401  (public names)
from pissa.adapters.kinds.lora import to_lora as pissa_to_lora  # noqa: F401  (PiSSA -> rank-2r LoRA)


def to_lora(initial: Adapter | None, trained: Adapter) -> Adapter:
    """The plain LoRA that turns the model the adapter was initialised from into the trained model.

    Args:
        initial: the pissa_init adapter (the LoRA-shaped kind needs it; MoRA starts at zero and
            does not).
        trained: the trained adapter.

    Raises:
        PissaError: when the kind has no exact LoRA form (rotation MoRA, DoRA, full fine-tuning),
            or `initial` does not match `trained`.
    """
    return trained.spec.kind_module.to_lora(initial, trained)
