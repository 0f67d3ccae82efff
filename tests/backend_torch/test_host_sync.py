"""No host sync inside a torch training step: nothing in a micro-batch's forward and backward or in the
optimizer step reads a device value on the host (.item(), float(), bool(), int(), .tolist(),
.nonzero(), .numpy(), boolean-mask indexing, masked_select), so a GPU never waits for the host in a
step. torch.cuda.set_sync_debug_mode reports syncs on CUDA only; here every such call is counted
on the CPU with a TorchFunctionMode around Trainer.forward_backward and Trainer.update, which sees
each of them whatever device the tensor is on. The optimizer is AdamW as pissa builds it on CUDA
(fused: its step counter is never read on the host; the CPU build's default reads it)."""

from __future__ import annotations

import collections
import traceback

import pytest

torch = pytest.importorskip("torch")

from torch.overrides import TorchFunctionMode  # noqa: E402

from pissa.cli import main  # noqa: E402
from tests.conftest import DATA  # noqa: E402

SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.tolist,
         torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy, torch.masked_select, torch.Tensor.masked_select}


class Syncs(TorchFunctionMode):
    """Counts the torch calls that read a device value on the host, with where the first of each was."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()
        self.where: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func)) if func in SYNCS else None
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                name = "boolean-mask indexing"
        if name:
            self.seen[name] += 1
            self.where.setdefault(name, "".join(traceback.format_stack(limit=8)[:-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [[], ["--no-packing"], ["--grad-checkpointing", "--grad-accum", "2"]],
                         ids=["packed", "unpacked", "checkpointed"])
def test_a_training_step_never_waits_for_the_device(extra, tiny_chat, tmp_path, monkeypatch):
    import pissa_torch.train as train

    syncs, calls = Syncs(), collections.Counter()
    for name in ("forward_backward", "update"):
        real = getattr(train.Trainer, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            with syncs:
                return _real(self, *args, **kwargs)

        monkeypatch.setattr(train.Trainer, name, counted)
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: adamw(params, **{**kw, "fused": True}))
    assert main(["train", str(tiny_chat), "--data", str(DATA / "train.jsonl"), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "4", "--max-seq-len", "256", "--backend", "torch", "--no-progress",
                 *extra]) == 0
    assert calls["update"] == 2 and calls["forward_backward"] >= 2  # every step ran inside the counter
    assert not syncs.seen, (dict(syncs.seen), syncs.where)


def test_the_counter_sees_a_sync():
    """The check above can fail: each kind of call it looks for is counted."""
    t = torch.arange(4.0)
    with Syncs() as syncs:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t[t > 1]
        t.nonzero()
    assert set(syncs.seen) == {"item", "__float__", "__bool__", "boolean-mask indexing", "nonzero"}, syncs.seen
