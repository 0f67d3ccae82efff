"""Interoperability with mlx-lm itself: a residual folder written by `pissa init` loads with
mlx_lm.load, and a converted LoRA exported with `--format mlx-lm` loads with
mlx_lm.load(BASE, adapter_path=...) on the ORIGINAL model and gives our trained model's logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from pissa.cli import main  # noqa: E402
from pissa.files.formats.mlx_lm import load_mlx_adapter, save_mlx_adapter  # noqa: E402
from pissa.adapters.adapter import Adapter  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from tests.conftest import DATA, PROMPT_IDS, rel_max_diff  # noqa: E402

IDS = mx.array(PROMPT_IDS)


def mlx_lm_logits(model_dir, adapter_path=None):
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    return np.array(model(IDS))


def pissa_logits(model_dir, adapter_dir=None):
    import pissa_mlx

    model, _ = pissa_mlx.load(model_dir, adapter_dir)
    return np.array(model(IDS))


def test_init_folder_loads_in_mlx_lm_with_the_rope_base_of_transformers(tiny_chat, tmp_path):
    """transformers 5 writes the rope base only in rope_parameters and mlx-lm reads only a
    top-level rope_theta (else 10000): a base of 1e5 given the transformers 5 way must reach mlx-lm."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_chat.parent / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e5}
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "init"
    assert main(["init", str(base), "--out", str(out), "--rank", "4", "--backend", "mlx", "--no-progress"]) == 0
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(torch.tensor(PROMPT_IDS)).logits
        residual = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(torch.tensor(PROMPT_IDS)).logits
    assert rel_max_diff(mlx_lm_logits(out), residual.numpy()) < 1e-4      # the residual model alone
    assert rel_max_diff(pissa_logits(out), original.numpy()) < 1e-4       # residual + pissa_init = original
    assert rel_max_diff(residual.numpy(), original.numpy()) > 1e-2        # the residual is not the original


@pytest.fixture(scope="module")
def exported(mlx_run, tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora"
    assert main(["convert", "--initial", str(tiny_chat / "pissa_init"), "--trained", str(mlx_run / "adapter"),
                 "--out", str(out), "--format", "mlx-lm"]) == 0
    return out


def test_the_exported_files_are_mlx_lms(exported):
    from pissa.files.formats.safetensors import SafetensorsFile

    cfg = json.loads((exported / "mlx_lm" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1
    params = cfg["lora_parameters"]
    peft = load_adapter(exported)  # PEFT's files, with mlx-lm's in a folder of their own
    assert "fine_tune_type" not in json.loads((exported / "adapter_config.json").read_text())
    assert params["rank"] == 8 and params["dropout"] == 0.0 and params["scale"] == pytest.approx(peft.spec.scale)
    assert params["keys"] == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    f = SafetensorsFile(exported / "mlx_lm" / "adapters.safetensors")
    assert f.shape("model.layers.0.mlp.down_proj.lora_a") == (128, 8)   # [in, 2r]
    assert f.shape("model.layers.0.mlp.down_proj.lora_b") == (8, 64)    # [2r, out]
    back = load_mlx_adapter(exported / "mlx_lm")
    assert back.spec.rank == 8 and back.spec.scale == pytest.approx(peft.spec.scale)
    assert all(np.array_equal(back.factors[m][0], A) and np.array_equal(back.factors[m][1], B)
               for m, (A, B) in peft.factors.items())


def test_the_exported_lora_on_the_original_model_gives_the_trained_logits(exported, mlx_run, tiny_chat):
    ours = pissa_logits(tiny_chat, mlx_run / "adapter")
    theirs = mlx_lm_logits(tiny_chat.parent / "base", exported / "mlx_lm")
    assert rel_max_diff(theirs, ours) < 1e-4
    assert rel_max_diff(ours, pissa_logits(tiny_chat)) > 1e-3  # training changed the model


@pytest.mark.filterwarnings("error:Unexpected keyword arguments:UserWarning")
def test_the_exported_folder_still_loads_in_peft(exported, mlx_run, tiny_chat):
    """Both formats name their config adapter_config.json: mlx-lm's is in mlx_lm/, so PEFT reads its own
    without the warning it gave when both sets of fields shared one file (an error here)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat.parent / "base", dtype=torch.float32), exported)
    with torch.no_grad():
        theirs = model(torch.tensor(PROMPT_IDS)).logits.numpy()
    assert rel_max_diff(theirs, pissa_logits(tiny_chat, mlx_run / "adapter")) < 1e-4


def test_an_adapter_on_some_blocks_only_lands_on_those_blocks(tiny_chat, tmp_path):
    """num_layers -1 plus zeros elsewhere: checked against the same LoRA merged by `pissa merge`."""
    rng = np.random.default_rng(0)
    modules = {"model.layers.1.self_attn.q_proj": (64, 64), "model.layers.1.mlp.down_proj": (64, 128)}
    factors = {m: (0.1 * rng.standard_normal((4, n_in)).astype(np.float32),
                   0.1 * rng.standard_normal((n_out, 4)).astype(np.float32)) for m, (n_out, n_in) in modules.items()}
    lora = Adapter(AdapterSpec(rank=4, alpha=8, targets=tuple(modules), init="lora"), factors)
    (tmp_path / "mlx").mkdir()
    save_mlx_adapter(tmp_path / "mlx", lora)
    from pissa.files.formats.peft import save_adapter

    (tmp_path / "peft").mkdir()
    save_adapter(tmp_path / "peft", lora)
    base = tiny_chat.parent / "base"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "merged")]) == 0
    shutil.copy(base / "tokenizer.json", tmp_path / "merged")
    shutil.copy(base / "tokenizer_config.json", tmp_path / "merged")
    got = mlx_lm_logits(base, tmp_path / "mlx")
    assert rel_max_diff(got, mlx_lm_logits(tmp_path / "merged")) < 1e-5
    assert rel_max_diff(got, mlx_lm_logits(base)) > 1e-3


def write_original_smollm2(folder):
    """SmolLM2-135M as an ordinary float32 model folder: the ORIGINAL base an mlx-lm LoRA applies to."""
    from pissa.files.formats import hf
    from pissa.files.loaders import open_model

    source = open_model("smollm2-135m")
    shapes = source.shapes()
    folder.mkdir(parents=True)
    writer = hf.ModelWriter(folder, [(n, np.float32, s) for n, s in shapes.items()])
    for name in shapes:
        writer.write(name, np.asarray(source.get(name), dtype=np.float32))
    writer.close()
    hf.write_json(folder / "config.json", hf.model_config(source.config, "float32"))
    source.save_tokenizer(folder)
    return folder


@pytest.mark.slow
def test_smollm2_init_train_and_export_on_mlx(tmp_path, hf_smollm2):
    """On the real weights: init with --backend mlx gives transformers' logits; a few MLX training
    steps, exported for mlx-lm and loaded on the original model, give our logits; torch loads
    the MLX-trained adapter with the same logits."""
    import pissa_torch
    import torch

    out, run, lora = tmp_path / "smol", tmp_path / "run", tmp_path / "lora"
    assert main(["init", "smollm2-135m", "--out", str(out), "--dtype", "float32", "--rank", "16", "--init", "pissa-fast",
                 "--backend", "mlx", "--no-progress"]) == 0
    with torch.no_grad():
        reference = hf_smollm2(torch.tensor(PROMPT_IDS)).logits.numpy()
    assert rel_max_diff(pissa_logits(out), reference) < 1e-4
    assert main(["train", str(out), "--data", str(DATA / "train.jsonl"), "--out", str(run), "--steps", "3",
                 "--batch-size", "2", "--lr", "1e-3", "--max-seq-len", "128", "--backend", "mlx",
                 "--no-progress"]) == 0
    assert main(["convert", "--initial", str(out / "pissa_init"), "--trained", str(run / "adapter"),
                 "--out", str(lora), "--format", "mlx-lm"]) == 0
    ours = pissa_logits(out, run / "adapter")
    assert rel_max_diff(ours, reference) > 1e-3  # training changed the model
    assert rel_max_diff(mlx_lm_logits(write_original_smollm2(tmp_path / "original"), lora / "mlx_lm"), ours) < 1e-4
    model, _ = pissa_torch.load(out, run / "adapter")
    with torch.no_grad():
        assert rel_max_diff(model(torch.tensor(PROMPT_IDS)).logits.numpy(), ours) < 1e-4

    # pissa eval's batched greedy decoding (left-padded, BatchKVCache) on the trained model: each
    # prompt decodes as it does alone, and as transformers' greedy generate on the torch side.
    from pissa.files.models import load_for_inference
    from pissa_mlx import backend
    from pissa_mlx.backend import greedy

    prompts = [PROMPT_IDS[0], PROMPT_IDS[1][:4], PROMPT_IDS[0][:7], PROMPT_IDS[1][:1]]
    mlx_model = load_for_inference(backend, out, run / "adapter", None, "fp32")
    batched = greedy(mlx_model, prompts, 8, stops=set())
    assert batched == [greedy(mlx_model, [p], 8, set())[0] for p in prompts]
    for p, row in zip(prompts, batched):
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ids[0, len(p):].tolist() == row
