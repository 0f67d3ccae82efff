"""Packed rows on the MLX backend (pissa_mlx.packing, pissa_mlx.loss): for every architecture
unpackable() accepts, a packed batch gives each example the logits, loss and adapter gradient it
has alone; the refusals are real; and the chunked head loss equals the plain one, with its gradient.

Tolerances, float32: packed and unpacked runs differ only in rounding, from matmuls and softmax
sums over differently laid-out rows and, for RoPE, angles computed at other absolute positions
(|error| <= position * 2^-24 rad, under 1e-5 rad in 64-token rows). Measured: logits agree to
at most 3e-6 of their scale (Gemma 2; 5e-7 for most), losses to 4e-7 relative and gradients to
4e-6 (Gemma 3); the bounds below (1e-5 and 2e-5) leave room for BLAS differences, while naive
packing (no mask) is off by 0.9-2x the logits' scale.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx import nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

from pissa.training.batches import collate_rows, pack  # noqa: E402
from pissa.numeric.loss import IGNORE  # noqa: E402
from pissa.training.data import Example  # noqa: E402
from pissa_mlx import backend, loss, packing  # noqa: E402
from pissa_mlx.layers.lora import PissaLinear  # noqa: E402

VOCAB = 96
ROW = 64  # a packed row's capacity; LENGTHS holds an example as long as a row
LENGTHS = [7, 23, 40, 5, ROW, 12, 30, 2, 17, 9]
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB)
# Small windows and caps, so that the windows cut the examples and the softcap bends the logits.
CONFIGS = {
    "llama": dict(model_type="llama", **COMMON, tie_word_embeddings=False, rope_theta=1e4,
                  layer_types=["full_attention", "sliding_attention"], sliding_window=8),
    "mistral": dict(model_type="mistral", **COMMON, head_dim=32, tie_word_embeddings=False, rope_theta=1e6),
    "qwen2": dict(model_type="qwen2", **COMMON, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", **COMMON, head_dim=16, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=256),
    "gemma2": dict(model_type="gemma2", **COMMON, head_dim=16, query_pre_attn_scalar=16,
                   attn_logit_softcapping=5.0, final_logit_softcapping=2.0),
    "gemma3_text": dict(model_type="gemma3_text", **COMMON, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(model_type="phi3", **COMMON, tie_word_embeddings=False, rope_theta=1e4),
    "gpt2": dict(model_type="gpt2", n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_positions=128,
                 layer_norm_epsilon=1e-5, vocab_size=VOCAB),
}


def make_model(config: dict, seed: int = 0) -> nn.Module:
    """An mlx-lm model of `config` with random weights (norms too) and a random LoRA-shaped
    adapter (B != 0) on every linear layer but the head, frozen as pissa trains it."""
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if config["model_type"] == "gemma3_text":
        model.sanitize({})  # no lm_head in the weights: tied, as every Gemma 3
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.parameters()))
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and not path.endswith("lm_head"):
            out, inp = module.weight.shape
            layers.append((path, PissaLinear(module, 0.1 * mx.random.normal((4, inp)),
                                                       0.1 * mx.random.normal((out, 4)), 1.0)))
    model.update_modules(tree_unflatten(layers))
    backend.freeze(model)
    return model


def examples(seed: int = 0) -> list[Example]:
    """Token ids with labels on the second half of each example (a prompt, then its answer)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, VOCAB, n).tolist()
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


def batches(exs):
    rows = pack(range(len(exs)), [len(e.input_ids) for e in exs], ROW)
    assert max(map(len, rows)) >= 4 and [ROW] in [[len(exs[i].input_ids) for i in r] for r in rows]
    return collate_rows(exs, rows, 0), collate_rows(exs, [[i] for i in range(len(exs))], 0), rows


def per_example_logits(model, batch, rows, exs):
    """Each example's logits [len - 1, vocab] in a collated batch, through pissa_mlx.backend.logits."""
    z = np.array(backend.logits(model, batch, "fp32"))
    out = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(exs[i].input_ids)
            out[i] = z[r, at:at + n - 1]
            at += n
    return out


def loss_and_grads(model, batch):
    value_and_grad = nn.value_and_grad(model, lambda m, b: loss.token_loss_sum(m, b)[0])
    total, grads = value_and_grad(model, backend.to_arrays(batch, 0))
    return total.item(), dict(tree_flatten(grads))


def assert_close_trees(a: dict, b: dict, rel: float):
    assert a.keys() == b.keys() and a
    for k in a:
        scale = float(mx.abs(b[k]).max().item())
        assert float(mx.abs(a[k] - b[k]).max().item()) <= rel * scale, k


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_packed_rows_give_each_example_its_own_logits_loss_and_gradient(arch, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[arch]))
    assert backend.unpackable(tmp_path) is None
    model = make_model(CONFIGS[arch])
    exs = examples()
    packed, unpacked, rows = batches(exs)
    got = per_example_logits(model, packed, rows, exs)
    want = per_example_logits(model, unpacked, [[i] for i in range(len(exs))], exs)
    scale = max(np.abs(w).max() for w in want.values())
    assert max(np.abs(got[i] - want[i]).max() for i in want) <= 1e-5 * scale
    # The test can fail: the same rows without the mask (and positions) are far off.
    naive = per_example_logits(model, {k: packed[k] for k in ("input_ids", "labels")}, rows, exs)
    assert max(np.abs(naive[i] - want[i]).max() for i in want) > 1e-2 * scale

    total_p, grads_p = loss_and_grads(model, packed)
    total_u, grads_u = loss_and_grads(model, unpacked)
    assert abs(total_p - total_u) <= 1e-5 * total_u
    assert set(grads_p) == {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert_close_trees(grads_p, grads_u, 2e-5)
    assert backend.loss_sum(model, packed, "fp32")[1] == backend.loss_sum(model, unpacked, "fp32")[1]


def test_the_model_own_logits_are_hidden_states_through_the_head():
    """packing.hidden_states + head_logits is each architecture's __call__ (embedding scales,
    tied heads, Gemma 2's final softcap): the chunked loss relies on it."""
    ids = mx.array([[5, 17, 40, 3, 9, 60, 7, 64]])
    for arch, config in CONFIGS.items():
        model = make_model(config)
        want = model(ids)
        got = packing.head_logits(model, packing.hidden_states(model, ids))
        assert mx.abs(got - want).max().item() <= 1e-6 * mx.abs(want).max().item(), arch


def test_a_length_dependent_rope_is_refused_and_would_contaminate(tmp_path):
    """Dynamic NTK scaling changes the rope base once a sequence passes max_position_embeddings:
    a 64-token packed row rotates its short examples otherwise than they are alone."""
    import json

    config = dict(CONFIGS["llama"], layer_types=None, sliding_window=None, max_position_embeddings=32,
                  rope_scaling={"type": "dynamic", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "depends on the sequence length" in backend.unpackable(tmp_path)
    model = make_model(config)
    exs = examples()
    packed, _, rows = batches(exs)
    got = per_example_logits(model, packed, rows, exs)
    for i in (i for i in got if 2 < len(exs[i].input_ids) < 32):  # (position 0 is not rotated)
        alone = np.array(model(mx.array([exs[i].input_ids[:-1]])))[0]
        assert np.abs(got[i] - alone).max() > 1e-3 * np.abs(alone).max()


def test_unpackable_names_what_it_cannot_pack(tmp_path):
    import json

    from pissa.files.packable import unpackable_config

    assert "no config.json" in backend.unpackable(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert "not mamba" in backend.unpackable(tmp_path)
    assert unpackable_config({"model_type": "mistral"}) is None  # mlx-lm runs it as llama
    assert "depends on the sequence length" in unpackable_config(  # transformers 5 keeps it in rope_parameters
        {"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})


def test_gpt2_needs_its_positions_restarted():
    model = make_model(CONFIGS["gpt2"])
    exs = examples()
    packed, unpacked, rows = batches(exs)
    want = per_example_logits(model, unpacked, [[i] for i in range(len(exs))], exs)
    counting = dict(packed, position_ids=np.broadcast_to(np.arange(packed["input_ids"].shape[1]),
                                                         packed["input_ids"].shape))
    got = per_example_logits(model, counting, rows, exs)
    scale = max(np.abs(w).max() for w in want.values())
    assert max(np.abs(got[i] - want[i]).max() for i in want) > 1e-2 * scale


def test_to_arrays_picks_the_labelled_positions():
    exs = examples()
    packed, _, _ = batches(exs)
    a = backend.to_arrays(packed, 0)
    inputs, picks, targets = (np.array(a[k]) for k in ("inputs", "picks", "targets"))
    following = packed["labels"][:, 1:]
    n = int((following != IGNORE).sum())
    assert inputs.shape[1] % backend.PAD_MULTIPLE == backend.PAD_MULTIPLE - 1
    assert len(picks) == backend.picks_size(n) >= n and (targets[n:] == IGNORE).all()
    flat = np.pad(following, ((0, 0), (0, inputs.shape[1] - following.shape[1])), constant_values=IGNORE).reshape(-1)
    assert (flat[picks[:n]] == targets[:n]).all() and (targets[:n] != IGNORE).all()
    segments = np.array(a["segments"])
    assert (segments[:, :following.shape[1]] == packed["segment_ids"][:, :-1]).all()
    wide = backend.to_arrays(packed, 0, 100)  # pads up to 96: segments -1, positions counting on
    assert (np.array(wide["segments"])[:, following.shape[1]:] == -1).all()
    assert (np.diff(np.array(wide["positions"])[:, following.shape[1] - 1:], axis=1) == 1).all()
    assert [backend.picks_size(k) for k in (0, 1, 128, 129, 1000, 1025, 4000)] == [128, 128, 128, 256, 1024, 1152, 4096]


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("n", [10, 100])
def test_chunked_head_loss_equals_the_plain_one_with_its_gradients(cap, n, monkeypatch):
    """n = 10 is fewer rows than a chunk; n = 100 is four chunks of 32, the last one ragged."""
    monkeypatch.setattr("pissa.numeric.loss.CHUNK_ELEMENTS", 32 * VOCAB)  # chunks of 32 rows (the least)
    assert loss.chunk_rows(VOCAB) == 32
    mx.random.seed(1)
    h, w = mx.random.normal((n, 64)), 0.3 * mx.random.normal((VOCAB, 64))
    t = mx.random.randint(0, VOCAB, (n,))
    g = mx.random.uniform(shape=(n,))  # a cotangent per row, as a mask of labels gives

    def plain(h, w):
        z = h @ w.T
        z = z if cap is None else mx.tanh(z / cap) * cap
        return (nn.losses.cross_entropy(z, t) * g).sum()

    def chunked(h, w):
        return (loss.head_cross_entropy(h, w, t, cap) * g).sum()

    want, (dh, dw) = mx.value_and_grad(plain, argnums=(0, 1))(h, w)
    for f in (chunked, mx.compile(chunked)):
        got, (gh, gw) = mx.value_and_grad(f, argnums=(0, 1))(h, w)
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
        assert mx.abs(gh - dh).max().item() <= 1e-5 * mx.abs(dh).max().item()
        assert mx.abs(gw - dw).max().item() <= 1e-5 * mx.abs(dw).max().item()
    eval_only = (loss.chunked_losses(h, w, t, cap) * g).sum()
    assert abs(eval_only.item() - want.item()) <= 1e-6 * abs(want.item())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_token_loss_equals_full_logits_cross_entropy_with_the_adapter_gradient(arch, monkeypatch):
    """The whole loss (labelled rows gathered, head and cross-entropy in chunks of 32, compiled
    as the micro-step is) against mlx's own cross-entropy over the full logits."""
    from pissa_mlx.train import compiled_steps, make_optimizer
    from pissa.training.run import TrainConfig

    monkeypatch.setattr("pissa.numeric.loss.CHUNK_ELEMENTS", 32 * VOCAB)  # chunks of 32 rows (the least)
    model = make_model(CONFIGS[arch])
    exs = examples()
    _, unpacked, _ = batches(exs)
    ids, labels = mx.array(unpacked["input_ids"]), mx.array(unpacked["labels"])

    def reference(m):
        keep = labels[:, 1:] != IGNORE
        ce = nn.losses.cross_entropy(m(ids[:, :-1]), mx.where(keep, labels[:, 1:], 0))
        return (ce * keep).sum()

    want, want_grads = nn.value_and_grad(model, reference)(model)
    assert int((unpacked["labels"][:, 1:] != IGNORE).sum()) > 32 * 3  # several chunks
    cfg = TrainConfig(lr=1e-3, steps=1)
    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    micro_step, _ = compiled_steps(model, opt, cfg)
    total, grads = micro_step(backend.to_arrays(unpacked, 0), mx.array(1.0))
    assert abs(total.item() - want.item()) <= 1e-5 * want.item()
    assert_close_trees(dict(tree_flatten(grads)), dict(tree_flatten(want_grads)), 2e-5)


def test_the_compiled_packed_step_matches_the_uncompiled_loss_and_checkpointing():
    from pissa_mlx.train import checkpoint_blocks, compiled_steps, make_optimizer
    from pissa.training.run import TrainConfig

    model = make_model(CONFIGS["gemma3_text"])
    exs = examples()
    packed, unpacked, _ = batches(exs)
    want, want_grads = loss_and_grads(model, unpacked)
    checkpoint_blocks(model)
    cfg = TrainConfig(lr=1e-3, steps=1)
    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    micro_step, _ = compiled_steps(model, opt, cfg)
    total, grads = micro_step(backend.to_arrays(packed, 0, ROW), mx.array(1.0))
    assert abs(total.item() - want) <= 1e-5 * want
    assert_close_trees(dict(tree_flatten(grads)), want_grads, 2e-5)


def test_packed_rows_of_a_model_it_cannot_pack_raise():
    from pissa.errors import PissaError

    model = make_model(CONFIGS["llama"])
    model.model_type = "olmo"
    packed, _, _ = batches(examples())
    with pytest.raises(PissaError, match="--no-packing"):
        loss.token_loss_sum(model, backend.to_arrays(packed, 0))

