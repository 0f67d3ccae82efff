"""pissa_mlx's Python API on a tiny model: ops, apply, load, merge/unmerge, fuse, PEFT state dicts,
and the refusals (quantised base, an adapter for another model)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx import nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from pissa_mlx import PissaLinear, adapter_state_dict, apply, load, merge, save_adapter, unmerge  # noqa: E402
from pissa_mlx.backend import load_base  # noqa: E402
from pissa_mlx.ops import MlxOps, make_ops  # noqa: E402

from pissa.errors import PissaError  # noqa: E402
from pissa.adapters.adapter import Adapter  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from tests.conftest import rel_max_diff, write_tiny_llama  # noqa: E402

IDS = mx.array([[5, 17, 100, 42, 9, 120, 7]])  # within the tiny vocab of 128


def logits(model):
    return np.array(model(IDS))


def trainable(model) -> set[str]:
    return {k for k, _ in tree_flatten(model.trainable_parameters())}


@pytest.fixture
def base(tmp_path):
    return write_tiny_llama(tmp_path / "base")


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (3, 30, 20), (3, 20, 30)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_thin_svd_through_qr(shape, dtype):
    """mx.linalg.svd builds full square factors; ours must be thin, and exact."""
    ops = make_ops("cpu")
    W = np.random.default_rng(0).standard_normal(shape)
    with ops.scope(dtype):
        U, S, Vt = ops.svd(ops.asarray(W, dtype))
        k = min(shape[-2:])
        assert U.shape == (*shape[:-1], k) and S.shape == (*shape[:-2], k) and Vt.shape == (*shape[:-2], k, shape[-1])
        assert U.dtype == (mx.float64 if dtype == "float64" else mx.float32)
        rec = np.array((U * S[..., None, :]) @ Vt)
    np.testing.assert_allclose(rec, W, atol=1e-12 if dtype == "float64" else 1e-5)
    np.testing.assert_allclose(np.array(S), np.linalg.svd(W, compute_uv=False), rtol=1e-10 if dtype == "float64" else 1e-5)


def test_float64_is_kept_and_runs_on_the_cpu_stream(monkeypatch):
    """Metal has no float64, so scope() puts float64 work on the CPU stream, and float32 work on
    the ops' own device. The stream scope() asks for is recorded rather than observed: on Linux
    every device is the CPU, where running on the wrong stream could not fail."""
    ops = make_ops()
    x = ops.asarray(np.ones((2, 2)), "float64")
    assert x.dtype == mx.float64  # mx.array(np.float64) alone would give float32
    asked = []
    monkeypatch.setattr(mx, "stream", lambda s: asked.append(s) or contextlib.nullcontext())
    gpu = MlxOps(mx.gpu)  # built directly: make_ops("gpu") refuses where there is no Metal
    for ops, compute, stream in ((gpu, "float64", mx.cpu), (gpu, "float32", mx.gpu),
                                 (make_ops("cpu"), "float32", mx.cpu)):
        with ops.scope(compute):
            pass
        assert asked and asked.pop() == stream, (ops.device, compute)
    with pytest.raises(PissaError, match="unknown MLX device"):
        make_ops("cuda")


def test_apply_keeps_the_function_and_trains_only_the_factors(base):
    model = load_base(base)
    before = logits(model)
    apply(model, AdapterSpec(rank=4))
    assert rel_max_diff(logits(model), before) < 1e-5
    layers = [m for _, m in model.named_modules() if isinstance(m, PissaLinear)]
    assert len(layers) == 14 and not isinstance(model.lm_head, PissaLinear)
    names = trainable(model)
    assert len(names) == 28 and all(n.endswith((".lora_A", ".lora_B")) for n in names)


def test_apply_with_the_core_decomposition_matches_pissa_init(base, tmp_path):
    from pissa.jobs.init import run_init

    run_init(str(base), tmp_path / "init", AdapterSpec(rank=4), progress=False)
    model = load_base(base)
    apply(model, AdapterSpec(rank=4))
    ours = adapter_state_dict(model)
    files = load_adapter(tmp_path / "init" / "pissa_init")
    for module, (A, B) in files.factors.items():
        np.testing.assert_allclose(np.array(ours[f"base_model.model.{module}.lora_A.weight"]), A, atol=1e-6)
        np.testing.assert_allclose(np.array(ours[f"base_model.model.{module}.lora_B.weight"]), B, atol=1e-6)


def perturb(model, amount=0.05):
    """A "trained" adapter, so merging matters."""
    for _, layer in model.named_modules():
        if isinstance(layer, PissaLinear):
            layer.lora_A = layer.lora_A + amount * mx.random.normal(layer.lora_A.shape)
            layer.lora_B = layer.lora_B + amount * mx.random.normal(layer.lora_B.shape)


def test_merge_unmerge_and_fuse(tiny_chat):
    model, _ = load(tiny_chat)
    mx.random.seed(0)
    perturb(model)
    base_weights = {k: v for k, v in tree_flatten(model.parameters()) if k.endswith("base.weight")}
    want = logits(model)
    merge(model)
    assert rel_max_diff(logits(model), want) < 1e-5
    merged = dict(tree_flatten(model.parameters()))
    assert all(not mx.array_equal(merged[k], v).item() for k, v in base_weights.items())
    unmerge(model)
    after = dict(tree_flatten(model.parameters()))
    for k, v in base_weights.items():
        assert mx.abs(after[k] - v).max().item() <= 1e-6 * mx.abs(v).max().item(), k
    assert rel_max_diff(logits(model), want) < 1e-5
    layer = model.model.layers[0].self_attn.q_proj
    x = mx.random.normal((3, layer.base.weight.shape[1]))
    np.testing.assert_allclose(np.array(layer.fuse()(x)), np.array(layer(x)), atol=1e-5)
    assert type(layer.fuse()) is nn.Linear


def test_save_and_load_round_trip(tiny_chat, tmp_path):
    model, spec = load(tiny_chat)
    perturb(model)
    save_adapter(model, tmp_path / "a", spec)
    again, _ = load(tiny_chat, tmp_path / "a")
    assert rel_max_diff(logits(again), logits(model)) < 1e-6
    sd = adapter_state_dict(model)
    assert len(sd) == 28 and all(k.startswith("base_model.model.model.layers.")
                                 and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    a = sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    b = sd["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 128) and b.shape == (64, 4)  # PEFT's orientation: A [r, in], B [out, r]


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
    with pytest.raises(PissaError, match="match no nn.Linear"):
        apply(load_base(base), AdapterSpec(rank=4, targets=("nothing",)))


def test_a_model_is_adapted_once(base):
    model = apply(load_base(base), AdapterSpec(rank=4))
    with pytest.raises(PissaError, match="already has PiSSA layers"):
        apply(model, AdapterSpec(rank=4))


def test_a_quantised_base_is_refused(base):
    model = load_base(base)
    nn.quantize(model, group_size=32, bits=4)
    with pytest.raises(PissaError, match=r"quantised base layer model\.layers\.\d\.\S+ \(and 13 more\).*"
                                         r"run QPiSSA on the unquantised model instead: pissa init MODEL --quantize affine4"):
        apply(model, AdapterSpec(rank=4))
    # The layer itself wraps a quantised base (QPiSSA loads that way); api.apply is what refuses
    # to decompose one, or to put an adapter on one that QPiSSA did not write.
    q = model.model.layers[0].self_attn.q_proj
    assert PissaLinear(q, mx.zeros((4, 64)), mx.zeros((64, 4)), 1.0).quantized
    with pytest.raises(PissaError, match=r"is not a QPiSSA residual.*load a folder written by pissa init --quantize"):
        apply(model, AdapterSpec(rank=4), Adapter(AdapterSpec(rank=4), {}))


def test_a_quantised_mlx_lm_folder_is_refused(tiny_chat, tmp_path, capsys):
    from mlx_lm.convert import convert

    from pissa.cli import main

    convert(str(tiny_chat.parent / "base"), mlx_path=str(tmp_path / "q4"), quantize=True, q_group_size=32, q_bits=4)
    with pytest.raises(PissaError, match="needs the full-precision weight"):
        apply(load_base(tmp_path / "q4"), AdapterSpec(rank=4))
    # The CLI, given the quantised folder with an adapter: one line, exit code 2.
    rc = main(["eval", str(tmp_path / "q4"), "--adapter", str(tiny_chat / "pissa_init"), "--data", "x.jsonl",
               "--backend", "mlx", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("pissa: error: quantised base layer") and "unquantised model" in err[-1], err


def test_training_never_writes_into_the_callers_adapter_arrays(tiny_chat):
    adapter = load_adapter(tiny_chat / "pissa_init")
    before = {m: (A.copy(), B.copy()) for m, (A, B) in adapter.factors.items()}
    model = apply(load_base(tiny_chat), adapter.spec, adapter)
    perturb(model, 1.0)
    mx.eval(model.parameters())
    assert all(np.array_equal(A, before[m][0]) and np.array_equal(B, before[m][1])
               for m, (A, B) in adapter.factors.items())


def test_without_mlx_the_backend_says_how_to_install_it(tmp_path):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        for name in ("mlx", "mlx_lm"):
            sys.modules[name] = None
        try:
            import pissa_mlx
        except ImportError as e:
            print("IMPORT:", e)
        from tests.conftest import write_tiny_llama
        from pissa.cli import main
        sys.exit(main(["init", str(write_tiny_llama(__import__("pathlib").Path({str(tmp_path)!r}) / "t")),
                       "--out", {str(tmp_path / "out")!r}, "--backend", "mlx"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "IMPORT: pissa_mlx needs MLX; install it with: pip install 'pissa[mlx]'" in out.stdout
    assert out.returncode == 2 and "pip install 'pissa[mlx]'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
