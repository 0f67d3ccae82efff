import dataclasses
import json
from pathlib import Path

import pytest

from pissa.errors import PissaError
from pissa.adapters.spec import AdapterSpec, dumps, parse_targets

FIXTURES = Path(__file__).parent / "fixtures"


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
    ({"init": "bogus"}, "unknown init 'bogus'; choose one of pissa, pissa-fast, lora"),
    ({"kind": "bogus"}, "unknown adapter kind 'bogus'; choose one of lora"),
    ({"kind": "mora", "init": "pissa"}, "--init pissa is for the LoRA-shaped kinds .*; --kind mora has no init"),
    ({"kind": "full", "init": "mora"}, "--init mora is --kind mora, which conflicts with --kind full"),
    ({"options": {"mora_type": "sharing"}}, "--kind lora takes no option mora_type; it has no options"),
    ({"kind": "mora", "options": {"mora_type": "diagonal"}}, "unknown mora type 'diagonal'; choose sharing or rotation"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
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


WRITTEN = [
    AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")),
    AdapterSpec(rank=4, alpha=8, use_rslora=True, kind="dora", init="pissa-fast", dropout=0.05),
    AdapterSpec(rank=4, targets=r".*attn.*", init="lora"),
]


def _plain(d: dict) -> dict:
    """A PEFT to_dict() with enums as their values and sets as sorted lists."""
    return {k: (v.value if hasattr(v, "value") else sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


@pytest.mark.parametrize("spec", WRITTEN, ids=["pissa", "dora", "regex"])
@pytest.mark.parametrize("initialized", [False, True])
def test_peft_reads_our_config_without_complaint(spec, initialized, tmp_path, recwarn, caplog):
    """The installed (pinned) PEFT loads what we write with no warning, to the same values, and every
    key PEFT writes for the same LoRA and we do not is at PEFT's default, so PEFT's own config of this
    adapter says nothing ours leaves out."""
    peft = pytest.importorskip("peft")
    ours = spec.to_peft_config(initialized=initialized, base_model="some/model")
    (tmp_path / "adapter_config.json").write_text(dumps(ours))
    parsed = _plain(peft.LoraConfig.from_pretrained(tmp_path).to_dict())
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    for k, v in ours.items():
        assert parsed[k] == (sorted(v) if isinstance(v, list) else v), k
    default = _plain(peft.LoraConfig().to_dict())
    theirs = _plain(peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, use_rslora=spec.use_rslora, lora_dropout=spec.dropout,
        use_dora=spec.kind == "dora", task_type="CAUSAL_LM", base_model_name_or_path="some/model",
        target_modules=spec.targets if isinstance(spec.targets, str) else list(spec.targets),
        init_lora_weights=ours["init_lora_weights"]).to_dict())
    left_out = {k: v for k, v in theirs.items() if k not in ours and k != "peft_version"}
    assert left_out and {k: v for k, v in left_out.items() if v != default[k]} == {}
    assert AdapterSpec.from_peft_config(theirs, extras={"init": spec.init}).to_peft_config(
        initialized=initialized, base_model="some/model") == ours


def test_peft_0_22_config_loads():
    """adapter_config.json as PEFT 0.22 writes it (astra_config, lora_ga_config, ... all off): pissa
    0.1.0 refused it for its new astra_config key."""
    cfg = json.loads((FIXTURES / "peft-0.22-adapter_config.json").read_text())
    assert cfg["astra_config"] is None and cfg["peft_version"].startswith("0.22")
    spec = AdapterSpec.from_peft_config(cfg)
    assert (spec.rank, spec.alpha, spec.init, spec.targets) == (16, 32.0, "pissa-fast", ("q_proj", "v_proj"))
    assert spec.niter == 4


@pytest.mark.parametrize("off", [None, False, 0, 0.0, "", [], {}])
def test_unknown_keys_at_off_are_accepted(off):
    """Keys no PEFT release has yet, at the value PEFT writes while a feature is off."""
    cfg = AdapterSpec(rank=4).to_peft_config()
    for key in ("zeta_config", "use_zeta", "zeta_layers"):
        assert AdapterSpec.from_peft_config({**cfg, key: off}) == AdapterSpec(rank=4, init="lora")


@pytest.mark.parametrize("key, value", [
    ("zeta_config", {"r": 2, "mode": "ipm"}),   # a future method's config object
    ("use_zeta", True),                          # a future switch
    ("zeta_group_size", 16),                     # a future number
    ("lora_bias", True),                         # PEFT's own, not implemented here
    ("layers_to_transform", [0, 1]),
    ("modules_to_save", ["lm_head"]),
    ("bias", "all"),
    ("qalora_group_size", 32),
])
def test_active_keys_are_refused_by_name(key, value):
    cfg = AdapterSpec(rank=4).to_peft_config()
    with pytest.raises(PissaError) as e:
        AdapterSpec.from_peft_config({**cfg, key: value})
    msg = str(e.value)
    assert f"sets {key}=" in msg and "\n" not in msg and "does not implement" in msg


def test_peft_metadata_keys_at_any_value():
    cfg = AdapterSpec(rank=4).to_peft_config()
    meta = {"peft_version": "0.99.0", "revision": "main", "inference_mode": True, "auto_mapping": {"x": 1},
            "runtime_config": {"ephemeral_gpu_offload": True}, "bias": "none", "qalora_group_size": 16}
    assert AdapterSpec.from_peft_config({**cfg, **meta}) == AdapterSpec(rank=4, init="lora")


def test_peft_unknown_and_unsupported_keys():
    cfg = AdapterSpec().to_peft_config()
    with pytest.raises(PissaError, match="lora_rank"):
        AdapterSpec.from_peft_config({**cfg, "lora_rank": 3})
    with pytest.raises(PissaError, match="lora_bias"):
        AdapterSpec.from_peft_config({**cfg, "lora_bias": True})
    with pytest.raises(PissaError, match="init_lora_weights 'corda' is not supported"):
        AdapterSpec.from_peft_config({**cfg, "init_lora_weights": "corda"})
    with pytest.raises(PissaError, match="peft_type 'IA3' is not supported"):
        AdapterSpec.from_peft_config({**cfg, "peft_type": "IA3"})


def test_kind_and_init_are_two_axes():
    """--kind says what the layer computes, --init how a LoRA-shaped one starts; the kinds without
    an init take the old --init names as aliases, and their options are the kind's."""
    assert (AdapterSpec().kind, AdapterSpec().init) == ("lora", "pissa")
    mora = AdapterSpec(init="mora", options={"mora_type": "rotation"})
    assert (mora.kind, mora.init, mora.option("mora_type")) == ("mora", None, "rotation")
    assert mora == AdapterSpec(kind="mora", options={"mora_type": "rotation"})
    assert AdapterSpec(kind="mora").option("mora_type") == "sharing"
    assert (AdapterSpec(kind="full").kind, AdapterSpec(kind="full").init) == ("full", None)
    assert AdapterSpec(kind="mora").describe() == "mora (sharing)" and AdapterSpec(init="lora").describe() == "lora"
    for spec in (mora, AdapterSpec(kind="full"), AdapterSpec(init="pissa-fast", dropout=0.1)):
        assert AdapterSpec.from_dict(spec.to_dict()) == spec


def test_specs_written_before_the_two_axes_still_read():
    """pissa_config.json "spec" as pissa wrote it before --kind existed (tests/fixtures/legacy has
    whole folders): no "kind", MoRA's type at the top level, the kind named by "init"."""
    old = {"alpha": 2.0, "compute_dtype": "float64", "dtype": "float32", "niter": 4, "oversampling": 8, "rank": 2,
           "seed": 0, "targets": "all-linear", "use_rslora": False}
    assert AdapterSpec.from_dict({**old, "init": "mora", "mora_type": "rotation"}) == AdapterSpec(
        rank=2, kind="mora", options={"mora_type": "rotation"})
    assert AdapterSpec.from_dict({**old, "init": "full"}) == AdapterSpec(rank=2, kind="full")
    assert AdapterSpec.from_dict({**old, "init": "pissa-fast"}) == AdapterSpec(rank=2, init="pissa-fast")


def test_dropout_is_peft_lora_dropout():
    cfg = AdapterSpec(dropout=0.05).to_peft_config()
    assert cfg["lora_dropout"] == 0.05
    assert AdapterSpec.from_peft_config({**cfg, "lora_dropout": 0.1}).dropout == 0.1


def test_an_active_unknown_key_stops_the_cli_in_one_line(tmp_path, capsys):
    """The command line's form: exit 2, one line naming the key, nothing written; off, the folder loads."""
    import numpy as np

    from pissa.adapters.adapter import Adapter
    from pissa.cli import main
    from pissa.files.formats.peft import CONFIG, load_adapter, save_adapter

    rng = np.random.default_rng(0)
    factors = {"model.layers.0.self_attn.q_proj": (rng.standard_normal((2, 8), dtype=np.float32),
                                                   rng.standard_normal((8, 2), dtype=np.float32))}
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(folder, Adapter(AdapterSpec(rank=2, init="lora"), factors))
    cfg = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(dumps({**cfg, "zeta_config": {"r": 2}}))
    assert main(["convert", "--trained", str(folder), "--out", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'zeta_config={"r": 2}' in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "lora").exists()
    (folder / CONFIG).write_text(dumps({**cfg, "zeta_config": None}))
    assert np.array_equal(load_adapter(folder).factors["model.layers.0.self_attn.q_proj"][0], factors[
        "model.layers.0.self_attn.q_proj"][0])
