"""pissa's MLX backend (import name: pissa_mlx), for mlx-lm models on Apple silicon (and on the
CPU elsewhere, with mlx[cpu]).

Its public verbs are the core's, bound to this backend (pissa.adapters.model, pissa.files.models):
apply, load, merge, unmerge, adapter_state_dict, adapter_of, save_adapter. The framework
primitives they run on are pissa_mlx.backend; each adapter kind's layer is in pissa_mlx.layers.
"""

try:
    import mlx.core  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests/test_hygiene.py
    raise ImportError("pissa_mlx needs MLX; install it with: pip install 'pissa[mlx]'") from e

from pissa.files.models import verbs as _verbs  # noqa: E402
from pissa_mlx import backend as _backend  # noqa: E402
from pissa_mlx.layers.dora import DoraLinear  # noqa: E402
from pissa_mlx.layers.full import FullLinear  # noqa: E402
from pissa_mlx.layers.lora import PissaLinear  # noqa: E402
from pissa_mlx.layers.mora import MoraLinear  # noqa: E402

globals().update(_verbs(_backend))

__all__ = ["DoraLinear", "FullLinear", "MoraLinear", "PissaLinear", "adapter_of", "adapter_state_dict", "apply", "load", "merge",
           "save_adapter", "unmerge"]
