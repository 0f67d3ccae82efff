"""DoRA conformance on both backends: each DoraLinear's forward, merge, unmerge and fuse against the
float64 oracle (pissa.adapters.kinds.dora.merged), on a quantised base too; its forward with dropout
and its gradients against PEFT's own DoRA layer (peft/tuners/lora/variants.py, `use_dora=True`);
then `pissa init --kind dora` + `pissa train` on a tiny chat model: torch and MLX train to the same
adapter, PEFT loads RUN_DIR/adapter unchanged and gives our logits, `pissa merge` gives PEFT's
logits in transformers, mlx-lm loads RUN_DIR/adapter/mlx_lm and gives our MLX logits, and convert refuses.

Every bound below is derived from Higham's gamma_k = k eps / (1 - k eps) over the longest chain of
roundings, applied to the absolute values of the terms (|a + b| <= |a| + |b|); none is fitted."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from pissa.adapters.kinds import dora
from pissa.adapters.spec import AdapterSpec
from pissa.cli import main
from pissa.errors import PissaError
from pissa.files.formats.peft import load_adapter
from tests.conftest import BACKENDS, DATA, PROMPT_IDS, rel_max_diff

FORWARD_BACKENDS = [b for b in BACKENDS if b != "numpy"]
EPS = {"float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps)}
SHAPES = [(12, 12), (20, 7), (7, 31), (96, 64)]   # a square one: a norm over the wrong axis keeps the shape
RANK, ALPHA = 3, 5.0
SPEC = AdapterSpec(rank=RANK, alpha=ALPHA, kind="dora")


def gamma(k: int, eps: float) -> float:
    return k * eps / (1 - k * eps)


def problem(shape, seed, dtype="float64"):
    """W, bias, (A, B, m) and x [5, in]: B non-zero and m away from ||V||, so that every term counts."""
    rng = np.random.default_rng(seed)
    out, n_in = shape
    W, A, B = rng.standard_normal(shape), rng.standard_normal((RANK, n_in)), rng.standard_normal((out, RANK))
    m = np.linalg.norm(W + SPEC.scale * B @ A, axis=1) * rng.uniform(0.5, 1.5, out)
    arrays = [W, rng.standard_normal(out), A, B, m, rng.standard_normal((5, n_in))]
    if dtype == "float32":
        arrays = [a.astype(np.float32).astype(np.float64) for a in arrays]
    W, bias, A, B, m, x = arrays
    return W, bias, (A, B, m), x


def abs_terms(W, params):
    """(|m / ||V|||, |W| + s |B||A|): what every rounding error of the layer is proportional to."""
    A, B, m = params
    ratio = np.abs(m) / np.linalg.norm(W + SPEC.scale * B @ A, axis=1)
    return ratio, np.abs(W) + SPEC.scale * np.abs(B) @ np.abs(A)


def weight_bound(W, params, eps):
    """On the merged weight m/||V|| V: V (r products, 2 roundings), its norm (in squares, the sqrt),
    the ratio and the product: k = in + r + 6."""
    ratio, V = abs_terms(W, params)
    return gamma(W.shape[1] + RANK + 6, eps) * ratio[:, None] * V


def forward_bound(W, bias, params, x, eps):
    """On y = base(x) + (m/||V|| - 1)(base(x) - bias) + m/||V|| s B A x: the ratio's error (as
    above) times the output, plus the matmuls over `in` and r, plus the few sums: k = 2 in + 2 r + 10,
    on |x| (|ratio| + 1) (|W| + s|B||A|)^T + 2 |bias|."""
    ratio, V = abs_terms(W, params)
    k = 2 * W.shape[1] + 2 * RANK + 10
    return gamma(k, eps) * (np.abs(x) @ ((ratio[:, None] + 1) * V).T + 2 * np.abs(bias))


# ---------------------------------------------------------------------- one layer per backend
class Torch:
    def __init__(self, dtype):
        import torch

        self.torch, self.dt = torch, {"float64": torch.float64, "float32": torch.float32}[dtype]

    def layer(self, W, bias, params, base=None):
        from pissa_torch.layers.dora import DoraLinear

        torch = self.torch
        if base is None:
            base = torch.nn.Linear(W.shape[1], W.shape[0], dtype=self.dt)
            with torch.no_grad():
                base.weight.copy_(torch.from_numpy(W))
                base.bias.copy_(torch.from_numpy(bias))
        return DoraLinear.from_params(base, tuple(torch.from_numpy(p).to(self.dt) for p in params), SPEC).eval()

    def run(self, layer, x):
        with self.torch.no_grad():
            return layer(self.torch.from_numpy(x).to(self.dt)).double().numpy()

    def weight(self, module):
        return module.weight.detach().double().numpy()


class Mlx:
    def __init__(self, dtype):
        import mlx.core as mx

        self.mx, self.dt = mx, {"float64": mx.float64, "float32": mx.float32}[dtype]

    def layer(self, W, bias, params, base=None):
        from mlx import nn

        from pissa_mlx.layers.dora import DoraLinear

        mx = self.mx
        if base is None:
            base = nn.Linear(W.shape[1], W.shape[0])
            base.weight, base.bias = mx.array(W, dtype=self.dt), mx.array(bias, dtype=self.dt)
        layer = DoraLinear.from_params(base, tuple(mx.array(p, dtype=self.dt) for p in params), SPEC)
        layer.eval()
        return layer

    def run(self, layer, x):
        return np.array(layer(self.mx.array(x, dtype=self.dt)).astype(self.mx.float64))

    def weight(self, module):
        return np.array(module.weight.astype(self.mx.float64))


def framework(backend, dtype):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        return Mlx(dtype)
    pytest.importorskip("torch")
    return Torch(dtype)


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_merge_unmerge_and_fuse_equal_the_oracle(backend, dtype, shape):
    fw = framework(backend, dtype)
    W, bias, params, x = problem(shape, 7 * shape[0] + shape[1], dtype)
    merged = dora.merged(SPEC, params, W)   # the float64 oracle
    want = x @ merged.T + bias
    eps = EPS[dtype]
    layer = fw.layer(W, bias, params)
    assert (np.abs(fw.run(layer, x) - want) <= forward_bound(W, bias, params, x, eps)).all()
    layer.merge()
    assert layer.merged and (np.abs(fw.weight(layer.base) - merged) <= weight_bound(W, params, eps)).all()
    assert (np.abs(fw.run(layer, x) - want) <= forward_bound(W, bias, params, x, eps)).all()
    fused_merged = fw.weight(layer.fuse())
    layer.unmerge()
    # W' / ratio - s B A: the merged weight's error divided by the ratio, and two more roundings.
    _, V = abs_terms(W, params)
    assert not layer.merged and (np.abs(fw.weight(layer.base) - W) <= gamma(W.shape[1] + RANK + 10, eps) * V).all()
    assert (np.abs(fw.run(layer, x) - want) <= forward_bound(W, bias, params, x, eps)).all()
    for fused in (fw.weight(layer.fuse()), fused_merged):   # fuse adds m/||V|| V - W to W: one more rounding
        assert (np.abs(fused - merged) <= weight_bound(W, params, eps) + eps * np.abs(W)).all()


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
def test_a_quantised_base_gives_its_dequantised_weight_and_refuses_merge(backend):
    from pissa.numeric import quant

    W, bias, params, x = problem((48, 64), 3, "float32")
    q = quant.quantize(W.astype(np.float32), quant.scheme("affine4", 32))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from pissa.files.formats.quantized import pack_bits
        from pissa_torch.quantized import AffineQuantLinear

        fw = Torch("float32")
        base = AffineQuantLinear(torch.from_numpy(pack_bits(q.codes, 4).view(np.int32)), torch.from_numpy(q.scales),
                                 torch.from_numpy(q.biases), bits=4, group_size=32,
                                 bias=torch.from_numpy(bias.astype(np.float32)))
        deq = base.dequantize().double().numpy()
    else:
        mx = pytest.importorskip("mlx.core")
        from mlx import nn

        fw = Mlx("float32")
        linear = nn.Linear(64, 48)
        linear.weight, linear.bias = mx.array(W.astype(np.float32)), mx.array(bias.astype(np.float32))
        base = nn.QuantizedLinear.from_linear(linear, group_size=32, bits=4)
        deq = np.array(mx.dequantize(base.weight, base.scales, base.biases, group_size=32, bits=4)).astype(np.float64)
    assert np.abs(deq - W).max() > 1e-3   # the quantisation does change the weight
    layer = fw.layer(W, bias, params, base=base)
    want = x @ dora.merged(SPEC, params, deq).T + bias
    assert (np.abs(fw.run(layer, x) - want) <= forward_bound(deq, bias, params, x, EPS["float32"])).all()
    with pytest.raises(PissaError, match="quantised base"):
        layer.merge()
    assert not layer.merged
    fused = fw.weight(layer.fuse())
    assert (np.abs(fused - dora.merged(SPEC, params, deq)) <= weight_bound(deq, params, EPS["float32"])
            + EPS["float32"] * np.abs(deq)).all()


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
def test_the_norm_stays_float32_over_bf16_frozen_weights(backend):
    """Under bf16 precision the frozen weights are bf16 and the parameters float32 master weights:
    m / ||V|| is computed in float32 (a bf16 norm would be off by up to 2^-9, a whole-row scale)."""
    import ml_dtypes

    W, bias, params, x = problem((96, 64), 9, "float32")
    W = W.astype(ml_dtypes.bfloat16).astype(np.float64)   # what the bf16 base holds, exactly
    A, B, m = params
    want = m / np.linalg.norm(W + SPEC.scale * B @ A, axis=1)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        base = torch.nn.Linear(64, 96, dtype=torch.bfloat16)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(W))
        layer = Torch("float32").layer(W, bias, params, base=base)
        with torch.no_grad():
            got = layer.factor().double().numpy()
    else:
        mx = pytest.importorskip("mlx.core")
        from mlx import nn

        base = nn.Linear(64, 96)
        base.weight = mx.array(W, dtype=mx.float32).astype(mx.bfloat16)
        layer = Mlx("float32").layer(W, bias, params, base=base)
        got = np.array(layer.factor().astype(mx.float64))
    assert (np.abs(got - want) <= gamma(64 + RANK + 6, EPS["float32"]) * want).all()


# ---------------------------------------------------------------------- against PEFT's layer
def peft_layer(W, bias, params, dropout=0.0):
    """PEFT's DoRA layer (LoraConfig(use_dora=True)) on an nn.Linear holding W, with our A, B, m."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(W.shape[1], W.shape[0])

    model = One()
    with torch.no_grad():
        model.lin.weight.copy_(torch.from_numpy(W))
        model.lin.bias.copy_(torch.from_numpy(bias))
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True, target_modules=["lin"], lora_dropout=dropout)
    layer = peft.get_peft_model(model, cfg).base_model.model.lin
    A, B, m = params
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    return layer


def peft_formula_with_dropout(W, bias, params, x, dropped):
    """PEFT's forward in training with dropout, in float64: base(x) + (ratio - 1) W d + ratio s B A d, d the
    dropped-out x (mlx-lm would scale base(x) + s B A d instead: the same only without dropout)."""
    A, B, m = params
    ratio = m / np.linalg.norm(W + SPEC.scale * B @ A, axis=1)
    return x @ W.T + bias + (ratio - 1) * (dropped @ W.T) + ratio * SPEC.scale * (dropped @ A.T @ B.T)


def test_dropout_in_training_is_peft_s():
    """Both layers draw the same torch dropout mask from the same seed; MLX's draws its own, so a
    fixed mask stands in for its dropout, and both are checked against PEFT's formula."""
    torch = pytest.importorskip("torch")
    W, bias, params, x = problem((20, 16), 11, "float32")
    p = 0.5
    theirs = peft_layer(W.astype(np.float32), bias.astype(np.float32), tuple(a.astype(np.float32) for a in params),
                        dropout=p).train()
    ours = Torch("float32").layer(W, bias, params)
    ours.dropout = torch.nn.Dropout(p)   # what from_params builds for spec.dropout = p
    ours.train()
    xt = torch.from_numpy(x.astype(np.float32))
    torch.manual_seed(0)
    y_peft = theirs(xt).detach().double().numpy()
    torch.manual_seed(0)
    y_ours = ours(xt).detach().double().numpy()
    bound = forward_bound(W, bias, params, x, EPS["float32"]) / (1 - p)   # the mask scales x by 1 / (1 - p)
    assert (np.abs(y_ours - y_peft) <= 2 * bound).all()
    assert np.abs(y_ours - ours.eval()(xt).detach().double().numpy()).max() > 1e-2   # dropout did act
    mask = np.random.default_rng(0).random(x.shape) > p
    dropped = x * mask / (1 - p)
    want = peft_formula_with_dropout(W, bias, params, x, dropped)
    A, B, m = params
    ratio = m / np.linalg.norm(W + SPEC.scale * B @ A, axis=1)
    mlx_lm_style = ratio * (x @ W.T + SPEC.scale * dropped @ A.T @ B.T) + bias
    assert (np.abs(want - mlx_lm_style) > 2 * bound).any()   # the check below tells the two apart

    class FixedMask(torch.nn.Dropout):   # still a Dropout: the layer takes the training-with-dropout path
        def forward(self, v):
            return v * torch.from_numpy((mask / (1 - p)).astype(np.float32))

    ours.dropout = FixedMask(p)
    ours.train()
    assert (np.abs(ours(xt).detach().double().numpy() - want) <= bound).all()
    if "mlx" in FORWARD_BACKENDS:
        import mlx.core as mx
        from mlx import nn

        class Mask(nn.Module):
            def __call__(self, v):
                return v * mx.array(mask / (1 - p), dtype=v.dtype)

        layer = Mlx("float32").layer(W, bias, params)
        layer.dropout = Mask()
        layer.train()
        assert (np.abs(Mlx("float32").run(layer, x) - want) <= bound).all()
        assert (np.abs(ours(xt).detach().double().numpy() - want) <= bound).all()


def oracle_gradients(W, params, x, G, detached=True):
    """Gradients of sum(G * y) for A, B, m in float64, written out. The norm is a constant when
    `detached` (PEFT, mlx-lm, the paper's 4.3); otherwise its own gradient is added."""
    A, B, m = params
    s = SPEC.scale
    V = W + s * B @ A
    n = np.linalg.norm(V, axis=1)
    ratio = m / n
    pre = x @ W.T + s * (x @ A.T) @ B.T                     # V x, [tokens, out]
    dm = np.sum(G * pre, axis=0) / n
    dB = s * (G * ratio).T @ (x @ A.T)
    dA = s * ((G * ratio) @ B).T @ x
    if not detached:
        dV = (-m * dm / n / n)[:, None] * V                  # d/dn of ratio, through n = ||V||
        dB, dA = dB + s * dV @ A.T, dA + s * B.T @ dV
    return dA, dB, dm


def gradient_bounds(W, params, x, G, eps):
    """|float32 gradient - oracle| per entry: the ratio's error (k = in + r + 6) and the sums over
    tokens, `in` and r of the absolute terms: k = 2 in + 2 r + tokens + 10."""
    A, B, m = params
    ratio, Vabs = abs_terms(W, params)
    n = np.linalg.norm(W + SPEC.scale * B @ A, axis=1)
    g = gamma(2 * W.shape[1] + 2 * RANK + len(x) + 10, eps)
    aG, ax = np.abs(G), np.abs(x)
    dm = np.sum(aG * (ax @ Vabs.T), axis=0) / n
    dB = SPEC.scale * (aG * ratio).T @ (ax @ np.abs(A).T)
    dA = SPEC.scale * ((aG * ratio) @ np.abs(B)).T @ ax
    return g * dA, g * dB, g * dm


def test_gradients_equal_peft_s_and_the_detached_oracle():
    torch = pytest.importorskip("torch")
    W, bias, params, x = problem((24, 40), 5, "float32")
    G = np.random.default_rng(6).standard_normal((len(x), 24)).astype(np.float32).astype(np.float64)
    want = oracle_gradients(W, params, x, G)
    bounds = gradient_bounds(W, params, x, G, EPS["float32"])
    undetached = oracle_gradients(W, params, x, G, detached=False)
    # An un-detached norm would fail the check: its gradients leave the bound.
    assert any((np.abs(u - w) > b).any() for u, w, b in zip(undetached, want, bounds))
    got = {}
    f32 = tuple(a.astype(np.float32) for a in params)
    theirs = peft_layer(W.astype(np.float32), bias.astype(np.float32), f32).train()
    xt, Gt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(G.astype(np.float32))
    (theirs(xt) * Gt).sum().backward()
    got["peft"] = tuple(p.grad.double().numpy() for p in (theirs.lora_A["default"].weight,
                        theirs.lora_B["default"].weight, theirs.lora_magnitude_vector["default"].weight))
    ours = Torch("float32").layer(W, bias, params).train()
    (ours(xt) * Gt).sum().backward()
    got["torch"] = tuple(p.grad.double().numpy() for p in ours.params())
    assert ours.base.weight.grad is None   # the base stays frozen
    if "mlx" in FORWARD_BACKENDS:
        import mlx.core as mx
        from mlx import nn
        from mlx.utils import tree_flatten

        holder = nn.Module()   # as in a model: AdapterLinear.update(x) is the adapter's output, not Module.update
        holder.layer = Mlx("float32").layer(W, bias, params)
        holder.train()
        grads = nn.value_and_grad(holder, lambda v: (holder.layer(v) * mx.array(G, dtype=mx.float32)).sum())(
            mx.array(x, dtype=mx.float32))[1]
        flat = dict(tree_flatten(grads))
        assert set(flat) == {f"layer.{k}" for k in dora.TENSORS}
        got["mlx"] = tuple(np.array(flat[f"layer.{k}"]).astype(np.float64) for k in dora.TENSORS)
    for who, grads in got.items():
        for name, g, w, b in zip(("A", "B", "m"), grads, want, bounds):
            assert (np.abs(g - w) <= b).all(), (who, name, np.abs(g - w).max(), b.min())
    for g, p in zip(got["torch"], got["peft"]):
        assert np.abs(g - p).max() <= 2 * max(b.max() for b in bounds)


# ---------------------------------------------------------------------- init, train, serve
FAST = ["--batch-size", "2", "--max-seq-len", "128", "--no-progress", "--steps", "2", "--lr", "1e-2",
        "--warmup-ratio", "0"]
INITS = ["pissa", "lora"]


@pytest.fixture(scope="module")
def dora_runs(tiny_chat_base, tmp_path_factory):
    """`pissa init --kind dora --init INIT --rank 4 --alpha 8`, then 2 steps on each backend."""
    root = tmp_path_factory.mktemp("dora")
    folders, runs = {}, {}
    for init in INITS:
        folders[init] = root / f"init-{init}"
        assert main(["init", str(tiny_chat_base), "--out", str(folders[init]), "--kind", "dora", "--init", init,
                     "--rank", "4", "--alpha", "8", "--no-progress"]) == 0
        for backend in FORWARD_BACKENDS:
            runs[init, backend] = root / f"run-{init}-{backend}"
            assert main(["train", str(folders[init]), "--data", str(DATA / "train.jsonl"), "--out",
                         str(runs[init, backend]), "--backend", backend, *FAST]) == 0
    return folders, runs


@pytest.mark.slow
@pytest.mark.parametrize("init", INITS)
def test_torch_and_mlx_train_to_the_same_adapter(init, dora_runs):
    # AdamW moves each entry by about lr * sign(gradient) at step 1; at step 2 by lr times a smooth
    # function of g2 / g1, so where a gradient is at rounding level (a cancellation) the backends'
    # float32 roundings show: measured here, 4e-4 of the move at most. A wrong gradient does not
    # hide there: an un-detached norm changes A's and B's gradients by 20-50% and fails this check.
    if len(FORWARD_BACKENDS) < 2:
        pytest.skip("needs both backends")
    folders, runs = dora_runs
    start = load_adapter(folders[init] / "pissa_init")
    t, m = load_adapter(runs[init, "torch"] / "adapter"), load_adapter(runs[init, "mlx"] / "adapter")
    assert t.spec.kind == m.spec.kind == "dora" and t.spec.init == init
    for module, params in t.factors.items():
        for name, p_t, p_m, p_0 in zip(dora.TENSORS, params, m.factors[module], start.factors[module]):
            moved = np.abs(p_t - p_0).max()
            assert moved > 1e-3, (module, name)   # (with LoRA's init, A moves from step 2: B = 0 before)
            assert np.abs(p_t - p_m).max() <= 1e-2 * moved, (module, name)


def torch_logits(model_dir, adapter):
    import torch

    import pissa_torch

    model, _ = pissa_torch.load(model_dir, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor(PROMPT_IDS)).logits.numpy()


def mlx_logits(model_dir, adapter):
    import mlx.core as mx

    import pissa_mlx

    model, _ = pissa_mlx.load(model_dir, adapter)
    return np.array(model(mx.array(PROMPT_IDS)))


# End to end, float32 logits through the tiny model: the project's 1e-5 relative (as MoRA's).
LOGITS_REL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("trained_on", FORWARD_BACKENDS)
def test_the_trained_adapter_runs_in_peft_transformers_and_mlx_lm(init, trained_on, dora_runs, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from pissa.files.loaders import open_model

    folders, runs = dora_runs
    model_dir, adapter = folders[init], runs[init, trained_on] / "adapter"
    ours = torch_logits(model_dir, adapter)
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        plain = base(ids).logits.numpy()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            served = peft.PeftModel.from_pretrained(base, adapter).eval()
        theirs = served(ids).logits.numpy()
    # PEFT's config holds PEFT's fields only (mlx-lm's are in adapter/mlx_lm): no "Unexpected keyword
    # arguments ... upgrade PEFT" warning, nor any other.
    assert not caught, [str(w.message) for w in caught]
    assert "fine_tune_type" not in json.loads((adapter / "adapter_config.json").read_text())
    # (a) PEFT reads the files unchanged (the magnitude included) and gives both backends' logits.
    trained = load_adapter(adapter)
    for name, module in served.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            mag = module.lora_magnitude_vector["default"].weight.detach().numpy()
            assert np.array_equal(mag, trained.factors[name.removeprefix("base_model.model.")][2]), name
    assert rel_max_diff(ours, theirs) < LOGITS_REL
    assert rel_max_diff(plain, theirs) > 1e-3   # training changed the model
    if "mlx" in FORWARD_BACKENDS:
        ours_mlx = mlx_logits(model_dir, adapter)
        assert rel_max_diff(ours_mlx, theirs) < LOGITS_REL
        # (c) mlx-lm loads its own DoRA files (adapter/mlx_lm) on the init folder and gives ours.
        import mlx.core as mx
        from mlx_lm import load

        served_mlx, _ = load(str(model_dir), adapter_path=str(adapter / "mlx_lm"))
        assert rel_max_diff(np.array(served_mlx(mx.array(PROMPT_IDS))), ours_mlx) < LOGITS_REL
    # (b) pissa merge writes the model PEFT's forward computes.
    assert main(["merge", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits.numpy()
    assert rel_max_diff(merged, theirs) < LOGITS_REL
    W = open_model(str(tmp_path / "merged")).get("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_allclose(np.linalg.norm(W.astype(np.float64), axis=1),
                               trained.factors["model.layers.0.self_attn.q_proj"][2], rtol=1e-5)   # rows of norm m
    # (d) no LoRA holds it: convert refuses in one line.
    capsys.readouterr()
    assert main(["convert", "--trained", str(adapter), "--initial", str(model_dir / "pissa_init"),
                 "--out", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no plain LoRA holds a DoRA update" in err[0]
