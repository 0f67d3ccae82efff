"""torchrun's ranks for pissa: the process group (gloo on the CPU, NCCL for CUDA tensors), the
model wrapped for data-parallel (DDP) or sharded (FSDP2 fully_shard) training, and the optimizer
state gathered to and scattered from the rank-independent file a checkpoint holds.

Every collective is torch.distributed's own and carries the group's timeout: gloo fails an
operation after it and NCCL's watchdog aborts; a peer that dies closes its sockets, and gloo fails
at once. The guard turns those failures into one LostContact line.
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pissa.dist import lost_contact
from pissa.errors import PissaError

# What gloo, NCCL and c10d say when a peer is gone or silent. They raise plain RuntimeErrors, so
# the message is all there is to tell a lost rank from a bug in the step.
_COMM = re.compile(r"Connection (closed|reset)|Timed out|timed out|[Gg]loo|NCCL|ProcessGroup|Broken pipe|"
                   r"DistBackendError|peer", re.S)


class TorchGroup:
    launcher = "torchrun"

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:  # "cuda" then means this rank's own GPU, for init and training alike
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            try:
                # CPU tensors (pissa's flags and loss sums; all of a CPU run) go through gloo.
                dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
            except (RuntimeError, ValueError) as e:
                raise PissaError(f"could not join torchrun's process group ({_reason(e)}); start pissa with "
                                 "torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_sum(self, x) -> np.ndarray:
        t = torch.tensor(np.asarray(x, dtype=np.float64))
        dist.all_reduce(t)
        return t.numpy()

    @contextlib.contextmanager
    def guard(self, what: str, timed: bool = True):
        # timed is moot: gloo and NCCL time every collective themselves, and only collectives.
        try:
            yield
        except RuntimeError as e:
            if not _COMM.search(str(e)):
                raise
            raise lost_contact(self, what, _reason(e)) from None


def make_group(rank: int, size: int, timeout: float) -> TorchGroup:
    group = TorchGroup(timeout)
    if (group.rank, group.size) != (rank, size):
        raise PissaError(f"torchrun said rank {rank} of {size}, the process group says {group.rank} of {group.size}")
    return group


def _reason(e: BaseException) -> str:
    """The first sentence of a c10d message, without its source location ("[.../pair.cc:553] ")."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return text.split(". ")[0].rstrip(".")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the modules whose class transformers lists in _no_split_modules
    (what accelerate's FSDP auto-wrap uses). Each becomes one FSDP2 unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: nn.Module, group, device: torch.device, shard: bool) -> nn.Module:
    """The module to run the training forward through.

    shard: FSDP2 fully_shard on every transformer block and then the root, in place (weights,
    gradients and optimizer state are split across ranks; the forward gathers each block's
    weights in turn). Otherwise DDP: a replica per rank, gradients all-reduced in the backward.
    DDP skips its initial broadcast (init_sync=False): every rank has read the same files.

    Raises:
        PissaError: --shard on a quantised (QPiSSA) base, whose packed 4-bit weights FSDP2 cannot
            split; train it data-parallel.
    """
    if group.size == 1:
        return model
    if not shard:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, init_sync=False)
    from pissa_torch.quantized import is_quantized
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(is_quantized(m) for m in model.modules()):
        raise PissaError("--shard cannot split a quantised (QPiSSA) residual; train it data-parallel without --shard")
    units = blocks(model)
    if not units:
        raise PissaError(f"--shard found no transformer blocks in {type(model).__name__} (no _no_split_modules); "
                         "train it data-parallel without --shard")
    mesh = init_device_mesh(device.type, (group.size,))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sync(net: nn.Module, last: bool):
    """Gradient sync only on a step's last micro-batch: the others accumulate locally."""
    if last:
        return contextlib.nullcontext()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: restored on the last micro-batch
        net.set_requires_gradient_sync(False)
        return _restore_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(net):
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def full_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with every sharded (DTensor) entry gathered whole: the same layout a
    single process saves, so a checkpoint resumes on any number of ranks. A collective."""
    state = opt.state_dict()
    # state_dict() hands out the optimizer's own per-parameter dicts: copy them before replacing.
    state["state"] = {i: {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v for k, v in entry.items()}
                      for i, entry in state["state"].items()}
    return state


def load_state(opt: torch.optim.Optimizer, state: dict, params: list[nn.Parameter]) -> None:
    """Load a whole (rank-independent) optimizer state, splitting each entry like its sharded
    parameter (FSDP2); plain parameters take it as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for index, entry in state["state"].items():
        p = params[index]
        if not isinstance(p, DTensor):
            continue
        for k, v in entry.items():
            if torch.is_tensor(v) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(p.shape):
                entry[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    opt.load_state_dict(state)
