"""pissa's PyTorch backend (import name: pissa_torch), for transformers models on CUDA or CPU.

Its public verbs are the core's, bound to this backend (pissa.adapters.model, pissa.files.models):
apply, load, merge, unmerge, adapter_state_dict, adapter_of, save_adapter. The framework
primitives they run on are pissa_torch.backend; each adapter kind's layer is in pissa_torch.layers.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests/test_hygiene.py
    raise ImportError("pissa_torch needs PyTorch; install it with: pip install 'pissa[torch]'") from e

from pissa.files.models import verbs as _verbs  # noqa: E402
from pissa_torch import backend as _backend  # noqa: E402
from pissa_torch.layers.dora import DoraLinear  # noqa: E402
from pissa_torch.layers.full import FullLinear  # noqa: E402
from pissa_torch.layers.lora import PissaLinear  # noqa: E402
from pissa_torch.layers.mora import MoraLinear  # noqa: E402

globals().update(_verbs(_backend))
# load() is the core's, with a model transformers' Trainer trains and saves (pissa_torch.hf_trainer).
from pissa_torch.hf_trainer import load  # noqa: E402

__all__ = ["DoraLinear", "FullLinear", "MoraLinear", "PissaLinear", "adapter_of", "adapter_state_dict", "apply", "load", "merge",
           "save_adapter", "unmerge"]
