"""MoRA in the core (pissa.adapters.kinds.mora): the dense update against direct definitions of the
paper's maps, the public code's merge where it is not defective, the two defects fixed, the exact
LoRA of the sharing type, the file layout, and `pissa init / convert / merge` on MoRA folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.cli import main
from pissa.errors import PissaError
from pissa.adapters.adapter import Adapter
from pissa.files.formats.peft import load_adapter, save_adapter
from pissa.adapters.kinds import mora
from pissa.adapters.spec import AdapterSpec

SMOL_DOWN = (576, 1536)   # SmolLM2-135M's down_proj [out, in]: in > out


def spec(kind: str, rank: int = 8) -> AdapterSpec:
    return AdapterSpec(rank=rank, kind="mora", options={"mora_type": kind})


def direct_update(kind: str, M: np.ndarray, x: np.ndarray, n_out: int) -> np.ndarray:
    """The update for one input vector x [in], written element by element from the definitions
    (paper eq. 6 and 9, our fold for rotation when L > out), with no matrices."""
    n = M.shape[0]
    n_in = len(x)
    L = -(-n_in // n) * n
    xp = np.array([x[j % n_in] for j in range(L)])                     # wrap padding
    if kind == "sharing":
        z = np.array([sum(xp[j] for j in range(L) if j % n == k) for k in range(n)])
        y = M @ z
        return np.array([y[k % n] for k in range(n_out)])
    out = np.zeros(L)
    for b in range(L // n):
        block = xp[b * n:(b + 1) * n]
        theta = [10000.0 ** (-2 * (i % (n // 2)) / n) for i in range(n)]
        half = [-block[i + n // 2] if i < n // 2 else block[i - n // 2] for i in range(n)]
        rotated = np.array([block[i] * np.cos(b * theta[i]) + half[i] * np.sin(b * theta[i]) for i in range(n)])
        out[b * n:(b + 1) * n] = M @ rotated
    if L <= n_out:
        return np.array([out[k % L] for k in range(n_out)])
    return np.array([sum(out[j] for j in range(L) if j % n_out == k) for k in range(n_out)])


@pytest.mark.parametrize("kind", ["sharing", "rotation"])
@pytest.mark.parametrize("shape", [(20, 6), (7, 31), (40, 40), (12, 45), (45, 12), (33, 50)])
def test_dense_update_equals_the_direct_definition(kind, shape):
    # (20, 6): in <= r_hat, where the public rotation merge fails; (7, 31): out < r_hat;
    # sizes r_hat does not divide; in > out (the fold) and in < out (tiling).
    rng = np.random.default_rng(sum(shape))
    s = spec(kind, rank=4)
    n = mora.shapes(s, shape)[0][0]
    M = rng.standard_normal((n, n))
    dW = mora.delta(s, (M,), shape)
    assert dW.shape == shape
    for _ in range(3):
        x = rng.standard_normal(shape[1])
        np.testing.assert_allclose(dW @ x, direct_update(kind, M, x, shape[0]), rtol=1e-10, atol=1e-10)


def public_merge(kind: str, M: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A numpy transcription of the public code's get_delta_weight (kongds/MoRA, peft-mora
    layer.py) for types 1 and 6, defects included."""
    n_out, n_in = shape
    r = M.shape[0]
    pad = r - n_in % r if n_in % r else 0
    repeat = -(-n_out // r)
    if kind == "sharing":
        w = np.zeros((r, n_in))
        for i in range(n_in + pad):
            w[:, i % n_in] += M[:, i % r]
        return np.concatenate([w] * repeat, axis=0)[:n_out]
    blocks = -(-n_in // r)
    w = np.zeros((n_in + pad, n_in))
    inv = 1.0 / 10000 ** (np.arange(0, r, 2) / r)
    freqs = np.outer(np.arange(blocks), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    M2 = np.concatenate([M[:, r // 2:], -M[:, :r // 2]], axis=-1)
    for i in range(blocks - 1):
        w[i * r:(i + 1) * r, i * r:(i + 1) * r] = M2 * sin[i] + M * cos[i]
    i = blocks - 1   # the public code reuses the loop variable here, undefined when blocks == 1
    w[i * r:, i * r:] = (M2 * sin[i] + M * cos[i])[:, :r - pad]
    if pad:
        w[i * r:, :pad] = (M2 * sin[i] + M * cos[i])[:, r - pad:]
    if n_in < n_out:
        return np.concatenate([w] * -(-n_out // (n_in + pad)), axis=0)[:n_out]
    return w[:n_out]


@pytest.mark.parametrize("kind, shape", [("sharing", (576, 1536)), ("sharing", (1536, 576)), ("sharing", (192, 576)),
                                         ("rotation", (1536, 576)), ("rotation", (576, 576)),
                                         ("rotation", (100, 64))])
def test_dense_update_equals_the_public_merge_where_it_is_not_defective(kind, shape):
    rng = np.random.default_rng(1)
    s = spec(kind)
    n = mora.shapes(s, shape)[0][0]
    M = rng.standard_normal((n, n))
    np.testing.assert_allclose(mora.delta(s, (M,), shape), public_merge(kind, M, shape), atol=1e-12)


def test_rotation_on_down_proj_reaches_every_input_feature():
    """The public code drops the blocks past `out` when in > out: on SmolLM2's down_proj at r = 8,
    886 of its 1536 input features never reach dW. Every one reaches ours."""
    s = spec("rotation")
    n = mora.shapes(s, SMOL_DOWN)[0][0]
    M = np.random.default_rng(0).standard_normal((n, n))
    ours = mora.delta(s, (M,), SMOL_DOWN)
    assert np.all(np.abs(ours).sum(axis=0) > 0)
    public = public_merge("rotation", M, SMOL_DOWN)
    assert int((np.abs(public).sum(axis=0) == 0).sum()) == 886
    # The inputs of the first block that no wrapped pad copies feed only that block, which both keep.
    pad = mora.padded_length(SMOL_DOWN[1], n) - SMOL_DOWN[1]
    assert np.allclose(ours[:, pad:n], public[:, pad:n])


def test_rotation_in_at_most_r_hat():
    # in = 6 <= r_hat = 14: one block, wrap-padded from 6 to 14 features; the public merge fails here.
    s = spec("rotation", rank=8)
    n = mora.shapes(s, (20, 6))[0][0]
    assert n == 14 and mora.padded_length(6, n) == 14
    M = np.random.default_rng(2).standard_normal((n, n))
    dW = mora.delta(s, (M,), (20, 6))
    assert np.all(np.abs(dW).sum(axis=0) > 0) and np.linalg.matrix_rank(dW) == 6
    # The public rotation merge fails on exactly this shape: with one block of inputs its loop
    # `for i in range(blocks - 1)` never runs and the line after it reads the unset i.
    assert -(-6 // n) == 1


def test_r_hat_and_parameter_count_match_a_rank_r_lora():
    for shape in [(576, 576), (192, 576), (1536, 576), SMOL_DOWN]:
        lora_params = 8 * sum(shape)
        for kind in ("sharing", "rotation"):
            n = mora.shapes(spec(kind), shape)[0][0]
            assert n == int(np.sqrt(sum(shape) * 8) + 0.5) // (2 if kind == "rotation" else 1) * (
                2 if kind == "rotation" else 1)
            assert abs(n * n - lora_params) <= 2 * n + 1


def test_sharing_is_exactly_a_lora_of_rank_r_hat():
    shape = (192, 576)
    s = spec("sharing")
    n = mora.shapes(s, shape)[0][0]
    M = np.random.default_rng(3).standard_normal((n, n))
    A, B = mora.lora_factors(s, M, shape)
    assert A.shape == (n, 576) and B.shape == (192, n)
    np.testing.assert_allclose(B @ A, mora.delta(s, (M,), shape), atol=1e-12)
    rot = mora.delta(spec("rotation"), (np.random.default_rng(4).standard_normal((78, 78)),), shape)
    assert np.linalg.matrix_rank(rot) == 192   # rotation: full rank, no LoRA can hold it


def trained_adapter(kind: str, shapes: dict[str, tuple[int, int]], seed: int = 0) -> Adapter:
    s = spec(kind, rank=4)
    rng = np.random.default_rng(seed)
    factors = {m: (rng.standard_normal(mora.shapes(s, shp)[0]).astype(np.float32),) for m, shp in shapes.items()}
    return Adapter(s, factors, info={"role": "trained", "shapes": {m: list(v) for m, v in shapes.items()}})


def test_convert_pads_every_module_to_one_rank_and_keeps_the_update():
    from pissa.jobs.convert import to_lora

    shapes = {"a.q_proj": (64, 64), "a.k_proj": (32, 64), "a.down_proj": (64, 128)}
    trained = trained_adapter("sharing", shapes)
    lora = to_lora(None, trained)
    assert lora.spec.rank == max(mora.shapes(trained.spec, s)[0][0] for s in shapes.values())
    assert lora.spec.scale == 1.0 and lora.info["role"] == "lora"
    for m, shp in shapes.items():
        A, B = lora.factors[m]
        want = mora.delta(trained.spec, trained.factors[m], shp)
        assert np.abs(B.astype(np.float64) @ A - want).max() <= 1e-6 * np.abs(want).max()
    with pytest.raises(PissaError, match="full-rank update.*pissa merge"):
        to_lora(None, trained_adapter("rotation", shapes))


def test_files_round_trip_in_the_public_layout(tmp_path):
    trained = trained_adapter("rotation", {"model.layers.0.mlp.down_proj": (64, 128)})
    save_adapter(tmp_path, trained)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_mora"] is True and cfg["mora_type"] == 6 and cfg["r"] == 4
    from pissa.files.formats.safetensors import load

    assert list(load(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    back = load_adapter(tmp_path)
    assert back.spec == trained.spec and back.spec.scale == 1.0
    np.testing.assert_array_equal(back.factors["model.layers.0.mlp.down_proj"][0],
                                  trained.factors["model.layers.0.mlp.down_proj"][0])
    # Without our sidecar, adapter_config.json alone says it is MoRA (as the public code writes it).
    (tmp_path / "pissa_config.json").unlink()
    assert load_adapter(tmp_path).spec.option("mora_type") == "rotation"
    cfg["mora_type"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PissaError, match="MoRA type 2 is not supported"):
        load_adapter(tmp_path)


def test_bad_spec_values():
    with pytest.raises(PissaError, match="unknown mora type 'diagonal'"):
        AdapterSpec(kind="mora", options={"mora_type": "diagonal"})
    with pytest.raises(PissaError, match="unknown init 'dora'"):
        AdapterSpec(init="dora")


# ---------------------------------------------------------------------- the command line
def test_init_writes_the_unchanged_model_and_a_zero_m(tiny_llama, tmp_path, capsys):
    from pissa.files.loaders import open_model

    out = tmp_path / "mora"
    assert main(["init", str(tiny_llama), "--out", str(out), "--init", "mora", "--mora-type", "rotation",
                 "--rank", "4", "--alpha", "32", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--alpha and --rslora are ignored" in err
    src, got = open_model(str(tiny_llama)), open_model(str(out))
    for name in src.shapes():
        np.testing.assert_array_equal(got.get(name), src.get(name))
    adapter = load_adapter(out / "pissa_init")
    assert adapter.spec.kind == "mora" and adapter.spec.scale == 1.0
    assert adapter.info["shapes"]["model.layers.0.self_attn.k_proj"] == [32, 64]
    assert all(not M.any() and M.shape[0] % 2 == 0 for (M,) in adapter.factors.values())
    assert len(adapter.factors) == 14


@pytest.mark.parametrize("argv, message", [
    (["--mora-type", "diagonal"], "argument --mora-type: invalid choice: 'diagonal'"),
    (["--quantize", "nf4"], "--quantize needs --kind lora (QPiSSA quantises the residual of PEFT's A and B), not --kind mora"),
])
def test_init_bad_input(tiny_llama, tmp_path, capsys, argv, message):
    out = tmp_path / "mora"
    assert main(["init", str(tiny_llama), "--out", str(out), "--init", "mora", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_merge_and_convert_of_a_trained_folder(tiny_llama, tmp_path):
    """pissa merge adds dW (the oracle) to the weights; pissa convert writes a LoRA that gives the
    same weights on the original model (sharing) and refuses rotation in one line."""
    from pissa.files.loaders import open_model

    for kind in ("sharing", "rotation"):
        init = tmp_path / kind
        assert main(["init", str(tiny_llama), "--out", str(init), "--init", "mora", "--mora-type", kind,
                     "--rank", "4", "--no-progress"]) == 0
        start = load_adapter(init / "pissa_init")
        shapes = {m: tuple(v) for m, v in start.info["shapes"].items()}
        trained = trained_adapter(kind, shapes, seed=5)
        trained.info.update(init_fingerprint=start.info["fingerprint"])
        (tmp_path / f"{kind}-trained").mkdir()
        save_adapter(tmp_path / f"{kind}-trained", trained)
        merged = tmp_path / f"{kind}-merged"
        assert main(["merge", str(init), "--adapter", str(tmp_path / f"{kind}-trained"), "--out", str(merged)]) == 0
        base, got = open_model(str(tiny_llama)), open_model(str(merged))
        for m, shp in shapes.items():
            want = base.get(m + ".weight") + mora.delta(trained.spec, trained.factors[m], shp)
            assert np.abs(got.get(m + ".weight") - want).max() <= 1e-5 * np.abs(want).max()
        lora_dir = tmp_path / f"{kind}-lora"
        code = main(["convert", "--trained", str(tmp_path / f"{kind}-trained"), "--out", str(lora_dir)])
        assert code == (0 if kind == "sharing" else 2)
    lora = load_adapter(tmp_path / "sharing-lora")
    via_lora = tmp_path / "via-lora"
    assert main(["merge", str(tiny_llama), "--adapter", str(tmp_path / "sharing-lora"), "--out", str(via_lora)]) == 0
    a, b = open_model(str(via_lora)), open_model(str(tmp_path / "sharing-merged"))
    for m in lora.factors:
        w = b.get(m + ".weight")
        assert np.abs(a.get(m + ".weight") - w).max() <= 1e-5 * np.abs(w).max()
    assert not (tmp_path / "rotation-lora").exists()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_layer_refuses_an_m_of_the_wrong_size(backend):
    """M must be the spec's r_hat for the weight's shape; the message names both."""
    from tests.conftest import BACKENDS

    s = spec("sharing")
    n = mora.shapes(s, (24, 40))[0][0]
    assert mora.wrong_shape(s, (24, 40), (n, n)) is None
    if backend not in BACKENDS:
        pytest.skip(f"needs {backend}")
    if backend == "torch":
        import torch
        from pissa_torch import MoraLinear

        base, M = torch.nn.Linear(40, 24, bias=False), torch.zeros(n + 2, n + 2)
    else:
        import mlx.core as mx
        import mlx.nn as nn
        from pissa_mlx import MoraLinear

        base, M = nn.Linear(40, 24, bias=False), mx.zeros((n + 2, n + 2))
    with pytest.raises(ValueError, match=rf"M \({n + 2}, {n + 2}\) does not fit a weight \(24, 40\) at rank 8 "
                                         rf"\(sharing: \({n}, {n}\)\)"):
        MoraLinear.from_params(base, (M,), s)
