"""pissa's MLX backend (import name: pissa_mlx), for mlx-lm models on Apple silicon (and on the
CPU elsewhere, with mlx[cpu])."""

try:
    import mlx.core  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests/test_hygiene.py
    raise ImportError("pissa_mlx needs MLX; install it with: pip install 'pissa[mlx]'") from e

from pissa_mlx.api import adapter_state_dict, apply, load, merge, save_adapter, unmerge  # noqa: E402
from pissa_mlx.layer import FullLinear, PissaLinear  # noqa: E402
from pissa_mlx.mora import MoraLinear  # noqa: E402

__all__ = ["FullLinear", "MoraLinear", "PissaLinear", "adapter_state_dict", "apply", "load", "merge", "save_adapter", "unmerge"]
