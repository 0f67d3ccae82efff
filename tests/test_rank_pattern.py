"""Per-module ranks and alphas (PEFT's rank_pattern and alpha_pattern): matched as PEFT matches them,
written and read in PEFT's config, and carried through init, training on both backends, conversion
to a plain LoRA, merging, and export to mlx-lm (one rank for all, padded with zeros) and llama.cpp.
Every trained or converted model is checked by the logits the other tools compute."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.adapters.spec import AdapterSpec
from pissa.cli import main
from pissa.errors import PissaError
from pissa.files.formats.peft import load_adapter
from tests.conftest import BACKENDS, DATA, PROMPT_IDS, rel_max_diff

TRAINING = [b for b in BACKENDS if b != "numpy"]
RANKS = {"q_proj": 2, r"layers\.1\.mlp\..*": 8}
ALPHAS = {"v_proj": 12}
PATTERN = ["--rank", "4", "--alpha", "4", "--rank-pattern", r"q_proj=2,layers\.1\.mlp\..*=8", "--alpha-pattern",
           "v_proj=12"]


def expected_rank(module: str) -> int:
    return 2 if module.endswith("q_proj") else 8 if ".layers.1.mlp." in module else 4


@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                    "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj",
                                    "model.layers.10.mlp.down_proj", "model.layers.1.self_attn.q_proj"])
def test_a_module_takes_the_pattern_peft_gives_it(module):
    peft_other = pytest.importorskip("peft.utils.other")
    spec = AdapterSpec(rank=4, alpha=4, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    key = peft_other.get_pattern_key(list(RANKS), module)
    assert spec.for_module(module).rank == RANKS.get(key, 4)
    key = peft_other.get_pattern_key(list(ALPHAS), module)
    assert spec.for_module(module).alpha == ALPHAS.get(key, 4)
    assert spec.for_module(module).rank_pattern == {} and spec.for_module(module).scale == \
        spec.for_module(module).alpha / spec.for_module(module).rank


@pytest.mark.parametrize("kwargs, words", [
    ({"rank_pattern": {"q_proj": 0}}, "must be a positive integer"),
    ({"rank_pattern": {"q_proj": 2.5}}, "must be a positive integer"),
    ({"alpha_pattern": {"(": 2}}, "not a valid regular expression"),
    ({"kind": "mora", "rank_pattern": {"q_proj": 2}}, "for the LoRA-shaped kinds"),
])
def test_bad_patterns_are_named(kwargs, words):
    with pytest.raises(PissaError, match=words):
        AdapterSpec(**kwargs)


def test_peft_reads_and_writes_the_patterns():
    peft = pytest.importorskip("peft")
    spec = AdapterSpec(rank=4, alpha=4, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    cfg = spec.to_peft_config()
    parsed = peft.LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})
    assert parsed.rank_pattern == RANKS and parsed.alpha_pattern == ALPHAS
    theirs = peft.LoraConfig(r=4, lora_alpha=4, rank_pattern=RANKS, alpha_pattern=ALPHAS, target_modules="all-linear",
                             task_type="CAUSAL_LM").to_dict()
    back = AdapterSpec.from_peft_config({k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()})
    assert (back.rank_pattern, back.alpha_pattern) == (RANKS, ALPHAS)


def test_the_cli_refuses_a_malformed_pattern(tiny_chat_base, tmp_path, capsys):
    assert main(["init", str(tiny_chat_base), "--out", str(tmp_path / "x"), "--rank-pattern", "q_proj:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=VALUE" in err[0] and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def patterned(tiny_chat_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("patterned") / "init"
    assert main(["init", str(tiny_chat_base), "--out", str(out), *PATTERN, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(patterned, tmp_path_factory):
    out = {}
    for backend in TRAINING:
        out[backend] = tmp_path_factory.mktemp(f"patterned-{backend}") / "run"
        assert main(["train", str(patterned), "--data", str(DATA / "train.jsonl"), "--out", str(out[backend]),
                     "--steps", "3", "--batch-size", "2", "--max-seq-len", "128", "--lr", "3e-3", "--backend", backend,
                     "--no-progress"]) == 0
    return out


def torch_logits(model_dir, adapter=None):
    torch = pytest.importorskip("torch")
    from pissa_torch import load

    model, _ = load(model_dir, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor(PROMPT_IDS)).logits.numpy()


def test_the_init_has_each_module_its_rank_and_is_the_model(patterned, tiny_chat_base):
    """The factors have each module's rank, and PEFT loads the init on the residual model and gives
    the original model's logits (step 0), as pissa's torch backend does."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    init = load_adapter(patterned / "pissa_init")
    assert {m: A.shape[0] for m, (A, B) in init.factors.items()} == {m: expected_rank(m) for m in init.factors}
    cfg = json.loads((patterned / "pissa_init" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == RANKS and cfg["alpha_pattern"] == ALPHAS
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_chat_base, dtype=torch.float32)(ids).logits.numpy()
        served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(patterned, dtype=torch.float32),
                                                patterned / "pissa_init").eval()
        theirs = served(ids).logits.numpy()
    for name, module in served.named_modules():  # PEFT gave every module the rank and scale pissa did
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            own = init.spec.for_module(name.removeprefix("base_model.model."))
            assert module.r["default"] == own.rank and module.scaling["default"] == pytest.approx(own.scale)
    assert rel_max_diff(theirs, original) < 1e-5
    assert rel_max_diff(torch_logits(patterned), original) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRAINING)
def test_trained_patterns_convert_merge_and_export(backend, patterned, runs, tiny_chat_base, tmp_path):
    """The trained adapter (each module its rank and scale) as a plain LoRA on the original model in
    PEFT, merged by pissa merge, in mlx-lm (padded to one rank, each module's scale in its B), and
    trained the same on both backends."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run = runs[backend]
    ours = torch_logits(patterned, run / "adapter")
    assert rel_max_diff(ours, torch_logits(patterned)) > 1e-3  # training moved the model
    other = runs[next(b for b in TRAINING if b != backend)] if len(TRAINING) > 1 else run
    assert rel_max_diff(torch_logits(patterned, other / "adapter"), ours) < 1e-4  # both backends, same run
    lora = tmp_path / "lora"
    assert main(["convert", "--initial", str(patterned / "pissa_init"), "--trained", str(run / "adapter"),
                 "--out", str(lora), "--format", "mlx-lm"]) == 0
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {k: 2 * r for k, r in RANKS.items()}
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_base,
                                                                                     dtype=torch.float32), lora)
        assert rel_max_diff(theirs.eval()(ids).logits.numpy(), ours) < 1e-5
    assert main(["merge", str(patterned), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits.numpy()
    assert rel_max_diff(merged, ours) < 1e-5
    if "mlx" in BACKENDS:
        import mlx.core as mx
        import mlx_lm

        mlx_cfg = json.loads((lora / "mlx_lm" / "adapter_config.json").read_text())
        assert mlx_cfg["lora_parameters"]["rank"] == 16  # the largest module's 2r
        model, _ = mlx_lm.load(str(tiny_chat_base), adapter_path=str(lora / "mlx_lm"))
        assert rel_max_diff(np.array(model(mx.array(PROMPT_IDS))), ours) < 1e-5
