"""pissa's PyTorch backend (import name: pissa_torch), for transformers models on CUDA or CPU."""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests/test_hygiene.py
    raise ImportError("pissa_torch needs PyTorch; install it with: pip install 'pissa[torch]'") from e

from pissa_torch.api import adapter_state_dict, apply, load, merge, save_adapter, unmerge  # noqa: E402
from pissa_torch.layer import FullLinear, PissaLinear  # noqa: E402
from pissa_torch.mora import MoraLinear  # noqa: E402

__all__ = ["FullLinear", "MoraLinear", "PissaLinear", "adapter_state_dict", "apply", "load", "merge", "save_adapter", "unmerge"]
