"""Past one process: which launcher started us, the group of ranks it made, and the rules every
rank follows. Framework-free; the groups themselves are the engines' own (pissa_torch.dist over
torch.distributed for torchrun, pissa_mlx.dist over mlx.core.distributed for mlx.launch).

What the core asks of a group is small: its rank and size, a sum of a small numpy array over all
ranks (flags, loss sums, token counts; gradients never pass through here), and a guard that turns
a collective which fails or outlives the timeout into one line (LostContact) instead of a hang.
`agree` is the one pattern built on top: work that only some ranks do, or that can fail on one
rank alone, ends with every rank knowing whether it failed anywhere, so nobody waits forever on a
rank that has already given up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np

from pissa.errors import LostContact, PeerFailed, PissaError

DEFAULT_TIMEOUT = 600.0  # seconds; torch's own default for NCCL


class Group(Protocol):
    rank: int
    size: int
    local_rank: int      # the rank within this machine: which GPU is ours
    launcher: str        # "torchrun", "mlx.launch", or "" for a single process
    timeout: float       # seconds a collective may wait before the job fails

    def all_sum(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """The float64 sum of x over every rank (a collective: every rank must call it)."""

    def guard(self, what: str, timed: bool = True) -> ContextManager:
        """The context around collectives (and the compute between them): a failed or timed-out
        collective inside raises LostContact naming `what`, or ends the process with that line.
        An engine without timeouts of its own times the whole block (MLX: a watchdog);
        timed=False leaves long compute without collectives of that engine (an eval) untimed."""


class Solo:
    """One process: every collective is the identity."""

    rank, size, local_rank, launcher, timeout = 0, 1, 0, "", math.inf

    def all_sum(self, x):
        return np.array(x, dtype=np.float64)

    def guard(self, what: str, timed: bool = True):
        return contextlib.nullcontext()


def launch() -> tuple[str, int, int]:
    """(launcher, rank, size) as the environment tells them, without joining any group.

    torchrun sets RANK and WORLD_SIZE; mlx.launch sets MLX_RANK and a hostfile (ring: MLX_HOSTFILE
    with a JSON list of hosts; jaccl: MLX_IBV_DEVICES; nccl: MLX_WORLD_SIZE).

    Raises:
        PissaError: MLX_RANK without any of those. mx.distributed.init() would then quietly make a
            group of one (mlx issue 3442), and each process would train alone on all the data and
            write the same folder.
    """
    env = os.environ
    if "MLX_RANK" in env:
        return "mlx.launch", int(env["MLX_RANK"]), _mlx_size(env)
    if "RANK" in env or "WORLD_SIZE" in env:
        try:
            return "torchrun", int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        except ValueError:
            raise PissaError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers; "
                             "start pissa with torchrun, which sets them") from None
    return "", 0, 1


def _mlx_size(env: Any) -> int:
    if "MLX_HOSTFILE" in env:
        path = Path(env["MLX_HOSTFILE"])
        if not path.is_file():
            raise PissaError(f"MLX_RANK is set but the hostfile MLX_HOSTFILE={path} does not exist, so "
                             "mx.distributed.init() would run this process alone; launch with mlx.launch")
        text = path.read_text().strip()
        try:
            return len(json.loads(text)) if text else 1  # mlx.launch -n 1 writes an empty hostfile
        except json.JSONDecodeError:
            raise PissaError(f"the hostfile {path} is not the JSON list mlx.launch writes") from None
    if "MLX_IBV_DEVICES" in env:
        path = Path(env["MLX_IBV_DEVICES"])
        return len(json.loads(path.read_text())) if path.is_file() else 0
    if "MLX_WORLD_SIZE" in env:
        return int(env["MLX_WORLD_SIZE"])
    raise PissaError("MLX_RANK is set but no hostfile is (MLX_HOSTFILE), so mx.distributed.init() would "
                     "quietly run every process alone on all the data (mlx issue 3442); start pissa with "
                     "mlx.launch, or unset MLX_RANK")


_group: Group | None = None


def current(timeout: float | None = None) -> Group:
    """This process's group, joined on first use (torchrun: torch.distributed; mlx.launch:
    mlx.core.distributed) and kept for the life of the process. A launcher with one process, or
    none, gives Solo. `timeout` (seconds) counts only at the first call.

    Raises:
        PissaError: a broken launch environment, or a launcher whose framework is missing.
    """
    global _group
    if _group is None:
        kind, rank, size = launch()
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        if not timeout > 0:
            raise PissaError(f"--dist-timeout must be > 0 seconds, got {timeout:g}")
        if size <= 1:
            _group = Solo()
        else:
            backend = "torch" if kind == "torchrun" else "mlx"
            try:
                module = __import__(f"pissa_{backend}.dist", fromlist=["make_group"])
            except ImportError as e:
                raise PissaError(f"started by {kind}, which needs the {backend} backend ({e}); "
                                 f"install it with: pip install 'pissa[{backend}]'") from None
            _group = module.make_group(rank, size, timeout)
    return _group


def lost_contact(group: Group, what: str, why: str) -> LostContact:
    return LostContact(f"rank {group.rank}: {what} failed: lost contact with the other ranks ({why}); a rank died, "
                       f"or waited more than --dist-timeout {group.timeout:g} s")


def agree(group: Group, fn: Callable[[], Any] | None, *, what: str, on: Sequence[int] | None = None) -> Any:
    """Run fn on the ranks in `on` (default: every rank), then let every rank learn, with one
    all_sum, whether it failed on any. Returns fn's result (None where fn did not run).

    Raises:
        The lowest failing rank re-raises its own error (marked rank_local, so the CLI prints it on
        whatever rank); other failing ranks raise PeerFailed when their error is a PissaError (the
        same bad input fails every rank alike: one line is enough); ranks that did not fail raise
        PeerFailed. LostContact passes straight through: there is nobody left to agree with.
    """
    if group.size == 1:
        return fn() if fn is not None else None
    result, error = None, None
    if fn is not None and (on is None or group.rank in on):
        try:
            result = fn()
        except LostContact:
            raise
        except BaseException as e:  # Ctrl-C and bugs too: the other ranks must not wait for us
            error = e
    flags = np.zeros(group.size)
    flags[group.rank] = error is not None
    with group.guard(what):
        flags = group.all_sum(flags)
    failed = [int(r) for r in np.flatnonzero(flags)]
    if error is not None:
        if failed[0] != group.rank and isinstance(error, PissaError):
            raise PeerFailed(str(error)) from None
        error.rank_local = True  # type: ignore[attr-defined]
        raise error
    if failed:
        raise PeerFailed(f"rank {failed[0]} failed during {what}")
    return result


def assign(costs: Sequence[float], size: int) -> list[int]:
    """The rank of each job: longest first, each to the least loaded rank (ties: the lowest rank
    and the earlier job). Deterministic, so every rank computes the same split alone. The most
    loaded rank ends at most one job's cost above the least loaded one."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


# Work to undo if a watchdog ends the process (pissa init's temporary folder), newest last.
_cleanups: list[Callable[[], None]] = []


@contextlib.contextmanager
def cleanup(fn: Callable[[], None]) -> Iterator[None]:
    """Run fn if a watchdog ends the process while inside this block (an exception that unwinds
    normally is the caller's to handle)."""
    _cleanups.append(fn)
    try:
        yield
    finally:
        _cleanups.remove(fn)


@contextlib.contextmanager
def watchdog(group: Group, what: str) -> Iterator[None]:
    """End the process with one line if the block outlives group.timeout. For engines whose
    collectives have no timeout of their own (MLX): a thread can neither interrupt a collective
    blocked in C++ nor raise into it, so it prints, undoes what was registered, and exits."""
    def expire() -> None:
        for fn in reversed(_cleanups):
            with contextlib.suppress(BaseException):
                fn()
        print(f"pissa: error: {lost_contact(group, what, f'no answer within {group.timeout:g} s')}",
              file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(group.timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
