"""pissa: PiSSA fine-tuning with a numpy core and PyTorch / MLX backends.

This package imports numpy only. The framework code lives in ``pissa_torch`` and ``pissa_mlx``.
"""

from pissa.errors import PissaError
from pissa.spec import AdapterSpec

__version__ = "0.1.0"
__all__ = ["AdapterSpec", "PissaError", "__version__"]
