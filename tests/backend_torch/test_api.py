"""pissa_torch's Python API on a tiny model: apply, load, merge/unmerge, fuse, PEFT state dicts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import AutoModelForCausalLM  # noqa: E402

from pissa.errors import PissaError  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from pissa_torch import PissaLinear, adapter_state_dict, apply, load, merge, save_adapter, unmerge  # noqa: E402
from pissa_torch.backend import from_numpy  # noqa: E402
from tests.conftest import rel_max_diff, write_tiny_llama  # noqa: E402

IDS = torch.tensor([[5, 17, 100, 42, 9, 120, 7]])  # within the tiny vocab of 128


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.numpy()


@pytest.fixture
def base(tmp_path):
    return write_tiny_llama(tmp_path / "base")


def test_apply_keeps_the_function_and_trains_only_the_factors(base):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = logits(model)
    apply(model, AdapterSpec(rank=4))
    assert rel_max_diff(logits(model), before) < 1e-5
    layers = [m for m in model.modules() if isinstance(m, PissaLinear)]
    assert len(layers) == 14 and not isinstance(model.lm_head, PissaLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 28


def test_apply_with_the_core_decomposition_matches_pissa_init(base, tmp_path):
    from pissa.jobs.init import run_init

    run_init(str(base), tmp_path / "init", AdapterSpec(rank=4), progress=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply(model, AdapterSpec(rank=4))
    ours = adapter_state_dict(model)
    files = load_adapter(tmp_path / "init" / "pissa_init")
    for module, (A, B) in files.factors.items():
        assert torch.allclose(ours[f"base_model.model.{module}.lora_A.weight"], from_numpy(A), atol=1e-6)
        assert torch.allclose(ours[f"base_model.model.{module}.lora_B.weight"], from_numpy(B), atol=1e-6)


def test_merge_unmerge_and_fuse(tiny_chat):
    model, spec = load(tiny_chat)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a "trained" adapter, so merging matters
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    want = logits(model)
    merge(model)
    assert rel_max_diff(logits(model), want) < 1e-5
    changed = [n for n, p in model.named_parameters() if n.endswith("base.weight") and not torch.equal(p, weights[n])]
    assert len(changed) == len(weights)
    unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert (p - weights[n]).abs().max() <= 1e-6 * weights[n].abs().max(), n
    assert rel_max_diff(logits(model), want) < 1e-5
    layer = next(m for m in model.modules() if isinstance(m, PissaLinear))
    x = torch.randn(3, layer.base.in_features)
    assert torch.allclose(layer.fuse()(x), layer(x), atol=1e-5)


def test_save_and_load_round_trip(tiny_chat, tmp_path):
    model, spec = load(tiny_chat)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    save_adapter(model, tmp_path / "a", spec)
    again, _ = load(tiny_chat, tmp_path / "a")
    assert rel_max_diff(logits(again), logits(model)) < 1e-6
    sd = adapter_state_dict(model)
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in sd)


def test_an_adapter_for_another_model_lists_every_mismatch(tiny_chat, tmp_path):
    from pissa.jobs.init import run_init

    other = write_tiny_llama(tmp_path / "other", hidden=96, inter=128, layers=3)
    run_init(str(other), tmp_path / "other_init", AdapterSpec(rank=4), progress=False)
    with pytest.raises(PissaError) as e:
        load(tiny_chat, tmp_path / "other_init" / "pissa_init")
    msg = str(e.value)
    assert "model.layers.2.self_attn.q_proj: not a target linear layer" in msg
    assert "model.layers.0.mlp.down_proj: A (4, 128) / B (96, 4) do not fit weight (64, 128)" in msg
    assert msg.count(";") >= 14 and "\n" not in msg


def test_targets_that_match_nothing(base):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with pytest.raises(PissaError, match="match no nn.Linear"):
        apply(model, AdapterSpec(rank=4, targets=("nothing",)))


def test_training_never_writes_into_the_callers_adapter_arrays(tiny_chat):
    """Regression: torch.from_numpy shares memory, so training once rewrote the initial adapter
    in memory and conversion then produced a wrong LoRA."""
    from pissa.files.formats.peft import load_adapter

    adapter = load_adapter(tiny_chat / "pissa_init")
    before = {m: (A.copy(), B.copy()) for m, (A, B) in adapter.factors.items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32)
    apply(model, adapter.spec, adapter)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(np.array_equal(A, before[m][0]) and np.array_equal(B, before[m][1])
               for m, (A, B) in adapter.factors.items())


def test_the_decomposition_runs_on_one_thread_under_a_passive_wait_policy(monkeypatch):
    """scripts/env.sh sets OMP_WAIT_POLICY=PASSIVE; LAPACK's SVD is then 6x slower on two threads
    than on one here (docs/benchmarks.md), so TorchOps.scope uses one and gives the pool back."""
    from pissa_torch.ops import make_ops

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with make_ops("cpu").scope("float32"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with make_ops("cpu").scope("float32"):
        assert torch.get_num_threads() == before
