import dataclasses

import pytest

from pissa.errors import PissaError
from pissa.spec import AdapterSpec, parse_targets


def test_defaults_and_scale():
    s = AdapterSpec()
    assert (s.rank, s.alpha, s.init, s.compute_dtype, s.dtype) == (16, 16.0, "pissa", "float64", "float32")
    assert s.scale == 1.0
    assert AdapterSpec(rank=16, alpha=32).scale == 2.0
    assert AdapterSpec(rank=16, alpha=32, use_rslora=True).scale == pytest.approx(8.0)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AdapterSpec().rank = 3


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "rank must be >= 1"),
    ({"rank": -2}, "rank must be >= 1"),
    ({"rank": 2.5}, "rank must be an integer"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"init": "olora"}, "unknown init method 'olora'"),
    ({"niter": -1}, "niter must be >= 0"),
    ({"dtype": "int8"}, "unknown storage dtype"),
    ({"compute_dtype": "float16"}, "unknown compute dtype"),
    ({"targets": "("}, "not a valid regular expression"),
    ({"targets": []}, "empty"),
])
def test_invalid_values_are_named(kwargs, words):
    with pytest.raises(PissaError, match=words):
        AdapterSpec(**kwargs)


def test_unknown_keys_rejected():
    with pytest.raises(PissaError, match=r"unknown adapter spec key\(s\) \['rnak'\]"):
        AdapterSpec.from_dict({"rnak": 4})


def test_target_matching_follows_peft():
    names = AdapterSpec(targets=("q_proj", "v_proj"))
    assert names.matches("model.layers.0.self_attn.q_proj")
    assert not names.matches("model.layers.0.self_attn.qq_proj")
    regex = AdapterSpec(targets=r".*\.0\.self_attn\.(q|k)_proj")
    assert regex.matches("model.layers.0.self_attn.k_proj")
    assert not regex.matches("model.layers.10.self_attn.k_proj")
    all_linear = AdapterSpec()
    assert all_linear.matches("model.layers.3.mlp.down_proj")
    assert not all_linear.matches("lm_head") and not all_linear.matches("model.embed_tokens")
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_targets(r".*q_proj") == r".*q_proj"


def test_resolve_errors():
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 32), "model.norm.weight": (32,)}
    assert AdapterSpec(rank=8).resolve(shapes) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(PissaError, match=r"rank 9 exceeds min\(out, in\)"):
        AdapterSpec(rank=9).resolve(shapes)
    with pytest.raises(PissaError, match="match no linear layer"):
        AdapterSpec(rank=2, targets=("nothing",)).resolve(shapes)


@pytest.mark.parametrize("spec", [
    AdapterSpec(),
    AdapterSpec(rank=8, alpha=16, use_rslora=True, targets=("q_proj", "v_proj"), init="pissa-fast", niter=2),
    AdapterSpec(rank=4, targets=r".*attn.*", init="lora"),
])
def test_peft_round_trip_is_lossless(spec):
    before = spec.to_peft_config(initialized=False)
    back = AdapterSpec.from_peft_config(before, extras={k: getattr(spec, k) for k in
                                                        ("oversampling", "seed", "dtype", "compute_dtype")})
    assert back == spec
    # Once initialised, PEFT must load weights instead of running the SVD again.
    assert spec.to_peft_config()["init_lora_weights"] is True


def test_peft_config_is_what_peft_writes():
    """Our written config has exactly PEFT's keys, and PEFT parses it back to the same values."""
    peft = pytest.importorskip("peft")
    ours = AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")).to_peft_config(initialized=False)
    theirs = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             init_lora_weights="pissa").to_dict()
    theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()}
    theirs["target_modules"] = sorted(theirs["target_modules"])
    theirs.pop("peft_version")
    ours.pop("peft_version")
    assert ours == theirs
    parsed = peft.LoraConfig(**{k: v for k, v in ours.items() if k not in ("peft_type",)})
    assert (parsed.r, parsed.lora_alpha, parsed.init_lora_weights) == (8, 16, "pissa")


def test_peft_unknown_and_unsupported_keys():
    cfg = AdapterSpec().to_peft_config()
    with pytest.raises(PissaError, match="unknown key"):
        AdapterSpec.from_peft_config({**cfg, "lora_rank": 3})
    with pytest.raises(PissaError, match="use_dora"):
        AdapterSpec.from_peft_config({**cfg, "use_dora": True})
    with pytest.raises(PissaError, match="init_lora_weights 'olora'"):
        AdapterSpec.from_peft_config({**cfg, "init_lora_weights": "olora"})
