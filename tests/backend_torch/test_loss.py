"""The torch backend's loss through the LM head in chunks (pissa_torch.loss.head_loss): the loss and
its gradients equal F.cross_entropy over the full logits, in float64 to rounding and through
tiny models with an adapter (softcapped Gemma 2, tied GPT-2), under bf16 autocast, through a DDP
and an FSDP2 wrapper, and for a model whose head it does not know."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from pissa.adapters.spec import AdapterSpec  # noqa: E402
from pissa.training.batches import collate_rows  # noqa: E402
from pissa.numeric.loss import IGNORE  # noqa: E402
from pissa_torch import apply, backend, loss  # noqa: E402
from tests.backend_torch.test_packing import ARCHS, REFUSED, ROWS, adapter_grads, examples, tiny  # noqa: E402
from tests.conftest import rel_max_diff  # noqa: E402

CPU = torch.device("cpu")


def plain(h, w, cap, t):
    z = h @ w.T
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, t, reduction="sum")


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("rows", [1, 7, 23, 64])  # one row a chunk; a last chunk of 2; one exact chunk; one part chunk
def test_head_loss_and_its_gradients_are_cross_entropys(cap, rows):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (23,), generator=gen)
    want = plain(h, w, cap, t)
    dh, dw = torch.autograd.grad(want, (h, w))
    got = loss.head_loss(h, w, cap, t, rows)
    assert got.dtype == torch.float64
    assert abs(float(got.detach()) - float(want)) <= 1e-13 * float(want)
    gh, gw = torch.autograd.grad(3.0 * got, (h, w))  # a scaled loss: the backward scales the saved gradient
    assert rel_max_diff(gh, 3.0 * dh) < 1e-12 and rel_max_diff(gw, 3.0 * dw) < 1e-12
    with torch.no_grad():
        assert float(loss.head_loss(h, w, cap, t, rows)) == float(got.detach())
    # The hidden state alone, as in training (the head frozen): no weight gradient is made.
    assert rel_max_diff(torch.autograd.grad(loss.head_loss(h, w.detach(), cap, t, rows), h)[0], dh) < 1e-12


def full_logits_loss(model, batch):
    """The reference: transformers' own logits (softcap included) at every position, and
    F.cross_entropy over all of them."""
    logits = model(**loss.model_inputs(model, batch)).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])  # a plain head; softcapped, tied; tied, Conv1D blocks
@pytest.mark.parametrize("packed", [False, True])
def test_model_loss_and_adapter_gradient_match_the_full_logits(arch, packed):
    model = tiny(ARCHS[arch])
    apply(model, AdapterSpec(rank=4))
    if arch == "gemma2":
        assert model.config.final_logit_softcapping == 30.0
        model.config.final_logit_softcapping = 0.5  # small enough to bend these logits: a wrong derivative shows
    exs = examples(2)
    batch = backend.to_device(collate_rows(exs, ROWS if packed else [[i] for i in range(len(exs))], 0), CPU)
    want = full_logits_loss(model, batch)
    want.backward()
    ref = adapter_grads(model)
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    for rows in (3, 1000):  # many chunks; one chunk with fewer rows than it holds
        got, n = backend.token_loss_sum(model, batch, "fp32", rows)
        assert n == labelled
        assert abs(float(got.detach()) - float(want)) <= 1e-6 * float(want), rows
        got.backward()
        grads = adapter_grads(model)
        for name in ref:
            assert rel_max_diff(grads[name], ref[name]) < 1e-5, (rows, name)


def test_bf16_autocast_gives_the_model_paths_loss_and_gradient():
    """Under autocast the chunks' logits are bf16 like the model's head's, then float32; the
    gradient takes the same casts back, so the two paths agree to bf16's rounding of the sums."""
    model = tiny(ARCHS["llama"])
    apply(model, AdapterSpec(rank=4))
    batch = backend.to_device(collate_rows(examples(3), ROWS, 0), CPU)
    with backend.autocast("bf16", CPU):
        want = full_logits_loss(model, batch)
    want.backward()
    ref = adapter_grads(model)
    got, _ = backend.token_loss_sum(model, batch, "bf16", 5)
    assert abs(float(got.detach()) - float(want)) <= 1e-5 * float(want)
    got.backward()
    grads = adapter_grads(model)
    assert max(rel_max_diff(grads[name], ref[name]) for name in ref) < 1e-3  # seen: 0 (the same bf16 products)


def test_a_model_whose_head_is_not_known_gets_its_own_head_on_the_labelled_positions():
    model = tiny(REFUSED["bloom"], "eager")
    assert loss.head_of(model) is None
    apply(model, AdapterSpec(rank=4))
    batch = backend.to_device(collate_rows(examples(), [[i] for i in range(8)], 0), CPU)
    want = full_logits_loss(model, batch)
    want.backward()
    ref = adapter_grads(model)
    got, _ = backend.token_loss_sum(model, batch, "fp32")
    assert abs(float(got.detach()) - float(want)) <= 1e-6 * float(want)
    got.backward()
    grads = adapter_grads(model)
    assert all(rel_max_diff(grads[name], ref[name]) < 1e-5 for name in ref)


def test_gradient_checkpointing_keeps_the_gradient():
    model = tiny(ARCHS["qwen2"])
    apply(model, AdapterSpec(rank=4))
    batch = backend.to_device(collate_rows(examples(), ROWS, 0), CPU)

    def step():
        saved = []  # what autograd keeps for the backward: checkpointing keeps the layers' inputs only
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            total = backend.token_loss_sum(model, batch, "fp32", 5)[0]
        total.backward()
        return adapter_grads(model), len(saved)

    want, kept = step()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the trainer does
    model.train()  # checkpointing only acts in training mode; this model has no dropout
    got, kept_checkpointed = step()
    assert kept_checkpointed < kept / 4
    assert all(rel_max_diff(got[name], want[name]) < 1e-6 for name in want)


def test_a_batch_without_labels_gives_zero_and_zero_gradients():
    model = tiny(ARCHS["llama"])
    apply(model, AdapterSpec(rank=4))
    rows = collate_rows(examples(), ROWS, 0)
    rows["labels"][:] = IGNORE  # a rank's filler row at an epoch's end (pissa.training.loop.rank_batch)
    got, n = backend.token_loss_sum(model, backend.to_device(rows, CPU), "fp32")
    assert n == 0 and float(got.detach()) == 0.0
    got.backward()  # every rank of a DDP run must take part in the backward, with or without labels
    assert all(not np.any(g) for g in adapter_grads(model).values())


def test_through_ddp_and_fsdp2_wrappers(tmp_path):
    """One rank of a gloo group: the forward runs through DDP's wrapper (its hooks fire) and through
    FSDP2's sharded model, whose head weight is a shard outside the forward; the adapter
    gradients are the plain model's, step after step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pissa_torch.dist import blocks

    batch = backend.to_device(collate_rows(examples(), ROWS, 0), CPU)

    def adapted():
        model = tiny(ARCHS["gemma2"])  # tied embeddings: the head's weight is the embedding's
        apply(model, AdapterSpec(rank=4))
        return model

    model = adapted()
    backend.token_loss_sum(model, batch, "fp32", 5)[0].backward()
    want = adapter_grads(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = adapted()
        ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False, init_sync=False)
        calls = []
        ddp.register_forward_pre_hook(lambda *args: calls.append(1))
        sharded = adapted()
        mesh = init_device_mesh("cpu", (1,))
        for unit in [*blocks(sharded), sharded]:  # as pissa_torch.dist.wrap shards a model
            fully_shard(unit, mesh=mesh)
        for step in range(2):
            backend.token_loss_sum(ddp, batch, "fp32", 5)[0].backward()
            assert len(calls) == step + 1
            got = adapter_grads(model)
            assert all(rel_max_diff(got[name], want[name]) < 1e-6 for name in want)
            backend.token_loss_sum(sharded, batch, "fp32", 5)[0].backward()
            got = {n: p.grad.full_tensor().numpy() for n, p in sharded.named_parameters() if p.requires_grad}
            sharded.zero_grad(set_to_none=True)
            assert all(rel_max_diff(got[name], want[name]) < 1e-6 for name in want)
        assert backend.loss_sum(sharded, collate_rows(examples(), ROWS, 0), "fp32")[1] == 32
    finally:
        dist.destroy_process_group()
