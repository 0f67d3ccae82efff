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
from pissa.numeric.loss import IGNORE  # noqa: E402
from pissa.training.data import Example  # noqa: E402
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
    """The same rows as one sequence each: a causal mask over the whole row, which mixes the examples."""
    return {k: v for k, v in batch.items() if k not in ("position_ids", "segment_ids", "records")}


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
        assert backend.unpackable(tmp_path) is None
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
    """Bloom and MPT compute attention their own way: packed rows through transformers' position_ids
    (its own packing) mix the examples, so pissa does not pack them, and refuses a packed batch."""
    model = tiny(REFUSED[arch], "eager", tmp_path)
    reason = backend.unpackable(tmp_path)
    assert reason and arch in reason
    exs = examples()
    want, _ = alone(model, exs)
    batch = {k: torch.from_numpy(v) for k, v in collate_rows(exs, ROWS, 0).items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    labels = batch["labels"][:, 1:]
    got = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                  ignore_index=IGNORE, reduction="sum"))
    assert abs(got - want) > 10 * TOL * want
    with pytest.raises(PissaError, match="--no-packing"):
        backend.loss_sum(model, collate_rows(exs, ROWS, 0), "fp32")


def test_unpackable_names_what_it_cannot_read(tmp_path):
    assert "no config.json to tell its architecture" in backend.unpackable(tmp_path)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2",
                                                              model_type="llama"))
    batch = backend.to_device(collate_rows(examples(), ROWS, 0), torch.device("cpu"))
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


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                      window_size=(-1, -1), softcap=0.0):
    """flash_attn_varlen_func as its documentation defines it, one record at a time in plain torch:
    q [total, H, d], k and v [total, KV, d] (H a multiple of KV), records cu_q[i]:cu_q[i + 1];
    window_size (left, right): key j is seen from query i when i - left <= j <= i + right (-1:
    unlimited); softcap: scores become softcap * tanh(scores / softcap)."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        s = qs @ ks.transpose(1, 2) * softmax_scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(b - a)
        keep = (i[None, :] <= i[:, None]) if causal else torch.ones(b - a, b - a, dtype=torch.bool)
        if window_size[0] >= 0:
            keep &= i[None, :] >= i[:, None] - window_size[0]
        out[a:b] = (torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("window, softcap", [(None, None), (4, None), (None, 2.0), (4, 2.0)])
def test_the_flash_varlen_call_is_the_bucket_attention(window, softcap, monkeypatch):
    """The call pissa makes to flash-attn's varlen kernel on a GPU (tokens, cumulative lengths, the
    window as (w - 1, 0), the softcap), against a plain-torch kernel of its documented semantics: the
    same outputs as the buckets' SDPA path the CPU runs, with GQA (4 query heads over 2 KV heads)."""
    from pissa_torch import attention

    batch = collate_rows(examples(), ROWS, 0)
    records = attention.DeviceLayout.of(batch["segment_ids"], batch["position_ids"], torch.device("cpu"))
    b, t = batch["input_ids"].shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    module = types.SimpleNamespace(training=False)
    want = attention.varlen(module, q, k, v, records, 0.3, 0.0, window, softcap)
    monkeypatch.setattr(attention, "flash_varlen", lambda query: fake_flash_varlen)
    got = attention.varlen(module, q, k, v, records, 0.3, 0.0, window, softcap)
    real = torch.from_numpy(batch["segment_ids"] >= 0)
    assert rel_max_diff(got[real].numpy(), want[real].numpy()) < 1e-12
