"""Packed batches on the torch backend (pissa_torch.loss): for every architecture it packs, the loss
and the adapter's gradient of rows holding several examples are those of the examples alone; for
the ones it refuses, packing would mix examples. Tiny random models built by transformers."""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from pissa.adapters.spec import AdapterSpec  # noqa: E402
from pissa.errors import PissaError  # noqa: E402
from pissa.training.batches import collate_rows  # noqa: E402
from pissa.training.data import IGNORE, Example  # noqa: E402
from pissa_torch import apply, backend, loss  # noqa: E402
from tests.conftest import rel_max_diff  # noqa: E402
from tests.test_gguf_archs import CASES  # noqa: E402

VOCAB = 128
ARCHS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),  # absolute positions
    **{arch: case.hf_config for arch, case in CASES.items()},  # mistral qwen2 qwen3 gemma2 gemma3 phi3
}
# A window of 4 tokens, shorter than most examples below, so that the sliding layers slide.
WINDOWS = {"mistral": dict(sliding_window=4), "phi3": dict(sliding_window=4), "gemma2": dict(sliding_window=4),
           "gemma3": dict(sliding_window=4),
           "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
           "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)}
REFUSED = {"bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4),  # ALiBi; mask ignores positions
           "mpt": dict(model_type="mpt", d_model=32, n_layers=2, n_heads=4)}

# Eight examples in three rows of 16, 16 and 15 tokens: four examples in the first row (one of a
# single token), one example exactly as long as the row in the second, three and a pad in the third.
LENGTHS = [3, 5, 1, 7, 16, 2, 9, 4]
ROWS = [[0, 1, 2, 3], [4], [5, 6, 7]]
# float32 forwards of the same tokens in rows of other lengths differ only in rounding: a few ulps
# (1.2e-7) of each token's loss, partly cancelling over the ~50 labelled tokens (seen: at most 1e-7
# of the sum, over every case here). Mixing examples moves the sum by 4e-4 to 3e-2 of itself.
TOL = 1e-6


def examples(seed: int = 0) -> list[Example]:
    """Random tokens; the first third of each example unlabelled, as a prompt is."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, VOCAB, n).tolist()
        out.append(Example(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def tiny(kwargs: dict, attention: str | None = None, folder=None, seed: int = 0):
    """A random transformers model of this config, every weight perturbed, in eval mode (GPT-2's
    dropout off), float32; its config.json written to `folder` when given."""
    kwargs = dict(kwargs)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=VOCAB, bos_token_id=None, eos_token_id=None,
                               pad_token_id=None, **kwargs)
    if folder is not None:
        cfg.save_pretrained(folder)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def unpacked(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("position_ids", "segment_ids")}


def alone(model, exs) -> tuple[float, int]:
    """The summed loss and token count of each example in a batch of its own."""
    parts = [backend.loss_sum(model, collate_rows(exs, [[i]], 0), "fp32") for i in range(len(exs))]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def attentions(arch):
    return ["eager"] if arch == "gemma2" else ["sdpa", "eager"]  # Gemma 2 has no sdpa (attention softcapping)


@pytest.mark.parametrize("arch,attention", [(a, i) for a in ARCHS for i in attentions(a)])
def test_packed_loss_is_the_examples_loss(arch, attention, tmp_path):
    exs = examples()
    batch = collate_rows(exs, ROWS, 0)
    assert "position_ids" in batch and batch["input_ids"].shape == (3, 16)
    for window in ({}, WINDOWS.get(arch)):
        if window is None:
            continue
        model = tiny({**ARCHS[arch], **window}, attention, tmp_path)
        assert model.config.use_cache  # loss_sum must not build a cache: transformers then ignores packing
        assert loss.unpackable(tmp_path) is None
        want, count = alone(model, exs)
        got, n = backend.loss_sum(model, batch, "fp32")
        assert n == count
        assert abs(got - want) <= TOL * want, (window, got - want)
        # The same rows without position_ids (a causal mask over the whole row) mix the examples:
        # the tolerance above tells the two apart.
        mixed, _ = backend.loss_sum(model, unpacked(batch), "fp32")
        assert abs(mixed - want) > 10 * TOL * want, (window, mixed - want)


@pytest.mark.parametrize("arch", list(REFUSED))
def test_refused_architectures_would_mix_examples(arch, tmp_path):
    model = tiny(REFUSED[arch], "eager", tmp_path)
    reason = loss.unpackable(tmp_path)
    assert reason and arch in reason
    exs = examples()
    want, _ = alone(model, exs)
    got, _ = backend.loss_sum(model, collate_rows(exs, ROWS, 0), "fp32")  # packed as the others are
    assert abs(got - want) > 10 * TOL * want


def test_unpackable_names_what_it_cannot_read(tmp_path):
    assert "cannot tell the architecture" in loss.unpackable(tmp_path)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    batch = {k: torch.from_numpy(v) for k, v in collate_rows(examples(), ROWS, 0).items()}
    with pytest.raises(PissaError, match="--no-packing"):
        loss.model_inputs(fake, batch)
    assert "position_ids" not in loss.model_inputs(fake, unpacked(batch))


def adapter_grads(model) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = p.grad.numpy().copy()
            p.grad = None
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen2"])
def test_packed_gradient_is_the_sum_of_the_examples_gradients(arch):
    model = tiny({**ARCHS[arch], **WINDOWS.get(arch, {})})
    apply(model, AdapterSpec(rank=4))  # the model stays in eval mode: GPT-2's dropout would differ
    exs = examples(1)
    for i in range(len(exs)):
        backend.token_loss_sum(model, backend.to_device(collate_rows(exs, [[i]], 0), torch.device("cpu")),
                               "fp32")[0].backward()
    want = adapter_grads(model)
    batch = backend.to_device(collate_rows(exs, ROWS, 0), torch.device("cpu"))
    backend.token_loss_sum(model, batch, "fp32")[0].backward()
    got = adapter_grads(model)
    assert len(got) == len(want) > 0
    for name in want:
        assert rel_max_diff(got[name], want[name]) < 2e-5, name  # seen: at most 1.2e-6; mixed: above 1
    backend.token_loss_sum(model, unpacked(batch), "fp32")[0].backward()
    mixed = adapter_grads(model)
    assert max(rel_max_diff(mixed[name], want[name]) for name in want) > 1e-3
