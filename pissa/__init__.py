"""pissa: PiSSA fine-tuning with a numpy core and PyTorch / MLX backends.

This package imports numpy only. The framework code lives in ``pissa_torch`` and ``pissa_mlx``.

The core is built in layers, each a folder that imports only from the layers below it (never from
one above, and with no import cycle, lazy imports included: tests/test_layers.py checks both):

0. ``errors``, ``dist``, ``memory``: the exceptions the CLI turns into one line, the launcher's
   group of ranks and the rules every rank follows, the process's memory;
1. ``numeric``: the math. The ``Ops`` protocol of array operations and its numpy reference, the
   decompositions (full and randomised SVD, sign canonicalisation, split, residual), the
   quantisers and QPiSSA's iteration, the storage dtypes, and the ``Backend`` protocol: what a
   framework must supply for the shared driver (pissa_torch and pissa_mlx implement both);
2. ``adapters``: what an adapter is. The frozen AdapterSpec (with its PEFT config round trip), the
   kinds (what a layer computes: lora, dora, mora, full) and the inits (how a LoRA-shaped adapter
   starts: pissa, pissa-fast, lora, olora, milora), each a registry entry with a float64 numpy
   oracle, the in-memory Adapter and its fingerprint, and the driver that puts adapters on any
   backend's model (apply, merge, adapter state);
3. ``files``: what is on disk. Checkpoint layouts, the loaders (safetensors, GGUF, the Hub) and the
   file formats (PEFT, mlx-lm, Hugging Face model folders, quantised layouts);
4. ``jobs``: ``pissa init`` (one process or split over ranks), ``merge`` and ``convert``;
5. ``training``: data and batching, the run folder, resume, the schedule and the step loop both
   backends share;
6. ``studies``: what a run is measured by. Eval and generation, forgetting (general text and the
   knowledge probe), the weight-change spectrum, the step-0 KL, ``pissa compare`` and its report;
7. ``cli`` (and this facade): the ``pissa`` command.
"""

from pissa.adapters.spec import AdapterSpec
from pissa.errors import PissaError

__version__ = "0.1.0"
__all__ = ["AdapterSpec", "PissaError", "__version__"]
