"""DoRA in the core (pissa.adapters.kinds.dora): the merged weight against the formula written here,
the init's magnitude (step 0 reproduces the model), the files (PEFT's keys and config, mlx-lm's
DoRA form), the init against PEFT's own `use_dora=True` (a tiny transformers Llama, and the real
SmolLM2 weights for the math), and `pissa init / convert / compare` refusing what has no meaning."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from pissa.adapters.adapter import Adapter
from pissa.adapters.kinds import dora
from pissa.adapters.spec import AdapterSpec
from pissa.cli import main
from pissa.errors import PissaError
from pissa.files.formats import safetensors
from pissa.files.formats.mlx_lm import save_mlx_adapter
from pissa.files.formats.peft import WEIGHTS, load_adapter, save_adapter
from pissa.files.loaders import open_model
from pissa.numeric.ops import NumpyOps
from tests.conformance import tolerances as tol

EPS32 = tol.EPS32
SHAPES = [(12, 12), (20, 7), (7, 31)]   # a square one, where a norm over the wrong axis has the right shape


def gamma(k: int, eps: float = EPS32) -> float:
    """Higham's gamma_k = k eps / (1 - k eps): the relative error bound of k chained roundings."""
    return k * eps / (1 - k * eps)


def dora_weight(W, A, B, m, s):
    """The paper's W' = m * V / ||V||_c, V = W + s B A, the norm of each output row, written out."""
    V = W + s * (B @ A)
    norms = np.sqrt(np.sum(V * V, axis=1))
    return np.stack([m[i] * V[i] / norms[i] for i in range(V.shape[0])])


def random_params(shape, rank, seed):
    rng = np.random.default_rng(seed)
    out, n_in = shape
    return (rng.standard_normal(shape), rng.standard_normal((rank, n_in)), rng.standard_normal((out, rank)),
            rng.uniform(0.5, 2.0, out))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_merged_is_the_dora_weight(shape):
    spec = AdapterSpec(rank=3, alpha=5, kind="dora")
    W, A, B, m = random_params(shape, 3, sum(shape))
    want = dora_weight(W, A, B, m, spec.scale)
    got = dora.merged(spec, (A, B, m), W)
    assert got.dtype == np.float64
    assert np.abs(got - want).max() <= gamma(shape[1] + 8, np.finfo(np.float64).eps) * np.abs(want).max()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), m, rtol=1e-12)   # the rows' norms are m
    got32 = dora.merged(spec, (A, B, m), W.astype(np.float32))
    assert got32.dtype == np.float32   # what `pissa merge` writes
    # float32 of float64 inputs: the inputs' rounding (eps/2 each) and k = in + r + 8 chained roundings.
    bound = gamma(shape[1] + 3 + 8) * (np.abs(m)[:, None] / np.linalg.norm(W + spec.scale * B @ A, axis=1)[:, None]
                                       * (np.abs(W) + spec.scale * np.abs(B) @ np.abs(A)) * 2)
    assert (np.abs(got32 - want) <= bound).all()


def step_zero_checks(spec, W, start):
    A, B, m = start.params
    assert A.shape == (spec.rank, W.shape[1]) and B.shape == (W.shape[0], spec.rank) and m.shape == (W.shape[0],)
    assert m.dtype == np.float32
    V = start.base.astype(np.float64) + spec.scale * B.astype(np.float64) @ A.astype(np.float64)
    np.testing.assert_allclose(m, np.sqrt((V * V).sum(axis=1)), rtol=EPS32)   # m is ||V||, rounded once
    # Step 0 is the model: m/||V|| = 1 up to that rounding, so the merged weight is base + s B A.
    assert np.abs(dora.merged(spec, start.params, start.base.astype(np.float64)) - V).max() <= EPS32 * np.abs(V).max()


@pytest.mark.parametrize("init", ["pissa", "pissa-fast", "lora", "olora", "milora"])
def test_init_magnitude_is_the_norm_of_the_start(init):
    spec = AdapterSpec(rank=4, alpha=8, kind="dora", init=init)
    W = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    (start,) = dora.init([W], ["m.q_proj"], spec, NumpyOps())
    step_zero_checks(spec, W, start)
    if init == "lora":
        assert np.array_equal(start.base, W) and not start.params[1].any()
    else:   # the residual's rows are not W's, but the start's are: m = ||W||
        np.testing.assert_allclose(start.params[2], np.linalg.norm(W.astype(np.float64), axis=1), rtol=1e-6)


def test_spec_files_and_peft_config(tmp_path):
    spec = AdapterSpec(rank=4, alpha=8, kind="dora", init="lora")
    assert spec.describe() == "dora (lora)" and spec.scale == 2.0
    cfg = spec.to_peft_config()
    assert cfg["use_dora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    back = AdapterSpec.from_peft_config(cfg)
    assert back.kind == "dora" and back.init == "lora" and back.scale == spec.scale
    assert AdapterSpec.from_peft_config({**cfg, "use_dora": False}).kind == "lora"
    W = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)
    (start,) = dora.init([W], ["model.layers.0.mlp.up_proj"], spec, NumpyOps())
    adapter = Adapter(spec, {"model.layers.0.mlp.up_proj": start.params})
    save_adapter(tmp_path, adapter)
    keys = set(safetensors.SafetensorsFile(tmp_path / WEIGHTS).keys())
    prefix = "base_model.model.model.layers.0.mlp.up_proj."
    assert keys == {prefix + "lora_A.weight", prefix + "lora_B.weight", prefix + "lora_magnitude_vector"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    again = load_adapter(tmp_path)
    assert again.spec == spec and all(np.array_equal(a, b) for a, b in zip(again.factors[prefix[17:-1]], start.params))
    # A file without the magnitude (a LoRA's tensors under a DoRA config) is refused, naming the module.
    f = safetensors.SafetensorsFile(tmp_path / WEIGHTS)
    tensors = {k: np.array(f.get(k)) for k in f.keys() if "magnitude" not in k}
    safetensors.save(tmp_path / WEIGHTS, tensors, metadata={"format": "pt"})
    with pytest.raises(PissaError, match="model.layers.0.mlp.up_proj: missing lora_magnitude_vector"):
        load_adapter(tmp_path)


def test_mlx_lm_files_are_its_dora_form(tmp_path):
    """mlx_lm/tuner/dora.py DoRALinear: lora_a [in, r], lora_b [r, out], m [out]; fine_tune_type dora."""
    spec = AdapterSpec(rank=3, alpha=6, kind="dora")
    rng = np.random.default_rng(2)
    params = {f"model.layers.{i}.self_attn.q_proj": (rng.standard_normal((3, 10)).astype(np.float32),
                                                      rng.standard_normal((8, 3)).astype(np.float32),
                                                      rng.uniform(1, 2, 8).astype(np.float32)) for i in (0, 1)}
    save_mlx_adapter(tmp_path, Adapter(spec, params))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"] == {"rank": 3, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    f = safetensors.SafetensorsFile(tmp_path / "adapters.safetensors")
    for module, (A, B, m) in params.items():
        assert np.array_equal(f.get(module + ".lora_a"), A.T) and np.array_equal(f.get(module + ".lora_b"), B.T)
        assert np.array_equal(f.get(module + ".m"), m)
    assert len(list(f.keys())) == 6
    rotation = AdapterSpec(rank=2, kind="mora", options={"mora_type": "rotation"})
    with pytest.raises(PissaError, match="mlx-lm has no layer for a mora adapter"):
        save_mlx_adapter(tmp_path, Adapter(rotation, {"x": (np.zeros((4, 4), np.float32),)}))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_init_cli_and_what_it_refuses(tiny_llama, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["init", str(tiny_llama), "--out", str(out), "--kind", "dora", "--init", "lora", "--rank", "4",
                 "--alpha", "8", "--no-progress"]) == 0
    capsys.readouterr()
    init = load_adapter(out / "pissa_init")
    assert init.spec.kind == "dora" and init.spec.init == "lora" and len(init.factors) == 14
    model = open_model(str(tiny_llama))
    for module, (A, B, m) in init.factors.items():
        np.testing.assert_allclose(m, np.linalg.norm(model.get(module + ".weight").astype(np.float64), axis=1),
                                   rtol=EPS32)
    # QPiSSA quantises a plain LoRA's residual; convert has no LoRA to give: one line each, exit 2.
    assert main(["init", str(tiny_llama), "--out", str(tmp_path / "q"), "--kind", "dora", "--quantize", "int8",
                 "--rank", "4", "--no-progress"]) == 2
    assert "--quantize needs --kind lora" in one_line_error(capsys)
    assert main(["convert", "--trained", str(out / "pissa_init"), "--out", str(tmp_path / "c")]) == 2
    err = one_line_error(capsys)
    assert "no plain LoRA holds a DoRA update" in err and "pissa merge MODEL_DIR --adapter ADAPTER" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "q").exists()


# ---------------------------------------------------------------------- the init against PEFT
def magnitude_bound(W, W_res_peft, A_peft, B_peft, s, W_res_ours, m):
    """Per-row bound on |m_ours - m_PEFT|, derived (not fitted). Both magnitudes are norms of a
    reconstruction of W's rows. PEFT's V = W_res + s B A (float32): W_res = W - (s B) A and the norm
    takes s (B A) again, so |V - W| <= gamma_(r+3) (2 s |B||A| + |W_res| + |W|) entrywise, and its
    float32 norm of `in` squares adds gamma_(in+2) relative. Ours is the exact norm of the stored
    W_res + s B A, whose residual was rounded once (<= eps |W_res|), then rounded to float32."""
    r, n_in = A_peft.shape
    e_peft = gamma(r + 3) * (2 * s * np.abs(B_peft) @ np.abs(A_peft) + np.abs(W_res_peft) + np.abs(W))
    e_ours = EPS32 * np.abs(W_res_ours)
    return np.linalg.norm(e_peft, axis=1) + np.linalg.norm(e_ours, axis=1) + (gamma(n_in + 2) + EPS32) * m


def peft_dora_layers(peft_model) -> dict[str, tuple[np.ndarray, ...]]:
    """module -> (A, B, m, base weight) of a PEFT model's DoRA layers, float64."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            out[name.removeprefix("base_model.model.")] = tuple(
                t.detach().double().numpy() for t in (module.lora_A["default"].weight, module.lora_B["default"].weight,
                                                      module.lora_magnitude_vector["default"].weight,
                                                      module.get_base_layer().weight))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_init_equals_peft_on_a_tiny_llama(init, tiny_llama, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "d"
    assert main(["init", str(tiny_llama), "--out", str(out), "--kind", "dora", "--init", init, "--rank", "4",
                 "--alpha", "8", "--no-progress"]) == 0
    ours, residual, original = load_adapter(out / "pissa_init"), open_model(str(out)), open_model(str(tiny_llama))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                          init_lora_weights="pissa" if init == "pissa" else True)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), cfg)
    theirs = peft_dora_layers(model)
    assert set(theirs) == set(ours.factors) and len(theirs) == 14
    s = ours.spec.scale
    for module, (pa, pb, pm, pres) in theirs.items():
        A, B, m = (p.astype(np.float64) for p in ours.factors[module])
        W, W_res = original.get(module + ".weight").astype(np.float64), residual.get(module + ".weight")
        bound = magnitude_bound(W, pres, pa, pb, s, W_res, m)
        assert (np.abs(m - pm) <= bound).all(), (module, np.abs(m - pm).max(), bound.min())
        if init == "pissa":   # the same split as PEFT's, within the float32 SVD's own error
            S = np.linalg.svd(W, compute_uv=False)
            prod = tol.float32_product_tol(S, 4, W.shape)
            assert np.abs(s * B @ A - s * pb @ pa).max() <= prod, module
            assert np.abs(W_res - pres).max() <= prod + tol.RECONSTRUCTION_REL * np.abs(W).max(), module
    # PEFT's own files name the tensors as ours do (the magnitude without ".weight").
    model.save_pretrained(tmp_path / "peft")
    theirs_keys = set(safetensors.SafetensorsFile(tmp_path / "peft" / "adapter_model.safetensors").keys())
    assert theirs_keys == set(safetensors.SafetensorsFile(out / "pissa_init" / "adapter_model.safetensors").keys())


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread: on this 2-core machine, shared with other jobs, the threaded SVDs
    (OpenBLAS's under numpy, torch's own) were measured 10-15x slower than on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_pissa_dora_init_equals_peft_on_smollm2(smollm2_matrices):
    """PiSSA+DoRA on 21 real SmolLM2 matrices: PEFT's magnitude, residual and s B A against ours
    (computed with the torch backend's Ops at float64, which give numpy's factors: tests/conformance)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from pissa_torch.ops import make_ops

    names = sorted(smollm2_matrices)
    holder = torch.nn.Module()   # PEFT adapts any nn.Module's nn.Linear children
    holder.layers = torch.nn.ModuleList(torch.nn.Linear(*smollm2_matrices[n].shape[::-1], bias=False) for n in names)
    with torch.no_grad():
        for name, lin in zip(names, holder.layers):
            lin.weight.copy_(torch.from_numpy(smollm2_matrices[name]))
    spec = AdapterSpec(rank=16, alpha=32, kind="dora", init="pissa")
    worst = 0.0
    with one_torch_thread():
        cfg = peft.LoraConfig(r=16, lora_alpha=32, use_dora=True, init_lora_weights="pissa",
                              target_modules=r"layers\.\d+")
        theirs = peft_dora_layers(peft.get_peft_model(holder, cfg))
        for i, name in enumerate(names):
            W = smollm2_matrices[name].astype(np.float32)
            W64 = W.astype(np.float64)
            (start,) = dora.init([W], [name], spec, make_ops("cpu"))
            pa, pb, pm, pres = theirs[f"layers.{i}"]
            A, B, m = (p.astype(np.float64) for p in start.params)
            assert (np.abs(m - pm) <= magnitude_bound(W64, pres, pa, pb, spec.scale, start.base, m)).all(), name
            worst = max(worst, float(np.max(np.abs(m - pm) / m)))
            prod = tol.float32_product_tol(torch.linalg.svdvals(torch.from_numpy(W64)).numpy(), spec.rank, W.shape)
            assert np.abs(spec.scale * (B @ A - pb @ pa)).max() <= prod, name
            assert np.abs(start.base - pres).max() <= prod + tol.RECONSTRUCTION_REL * np.abs(W64).max(), name
    assert worst < 1e-5, worst   # 2.7e-7 measured: two float32 roundings


# ---------------------------------------------------------------------- pissa compare
def test_compare_resolves_dora_methods():
    """`pissa compare --methods dora,dora+pissa` (a 2-step run on tiny_chat_base took 26 s here, too
    long for the suite; the methods are what it resolves)."""
    from pissa.studies.compare import method_spec

    assert method_spec("dora") == ("dora", "lora") and method_spec("dora+pissa") == ("dora", "pissa")
    assert method_spec("dora+olora") == ("dora", "olora")
