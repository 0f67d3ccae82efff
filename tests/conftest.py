"""Shared fixtures: the real SmolLM2 weights, tiny random models, and the backends under test."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pissa.numeric.ops import available_backends

BACKENDS = available_backends()


def pytest_collection_modifyitems(config, items):
    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from pissa.files.loaders import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from pissa.files.loaders import open_model

    return open_model(str(smollm2_path))


# A spread of the real model's 210 linear matrices: all seven kinds, first, middle and last layer.
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="session")
def smollm2_matrices(smollm2) -> dict[str, np.ndarray]:
    return {f"model.layers.{i}.{k}": np.array(smollm2.get(f"model.layers.{i}.{k}.weight"))
            for i in (0, 15, 29) for k in KINDS}


def tiny_llama_config(layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 128) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": hidden // 4, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }


def write_tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 128,
                     seed: int = 0, max_shard_bytes: int | None = None, dtype: str = "float32") -> Path:
    """A random Llama checkpoint written with pissa's own writer (no torch needed).

    Weights get a decaying spectrum so that PiSSA's top-r is well defined, like real weights.
    """
    from pissa.files.formats import hf
    from pissa.numeric.dtypes import np_dtype

    rng = np.random.default_rng(seed)
    cfg = tiny_llama_config(layers, hidden, inter, vocab)
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})

    def make(shape):
        if len(shape) == 1:
            return 1.0 + 0.1 * rng.standard_normal(shape)
        m, n = shape
        k = min(m, n)
        u, _ = np.linalg.qr(rng.standard_normal((m, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, k)))
        s = 2.0 / np.arange(1, k + 1) ** 0.7
        return (u * s) @ v.T

    folder.mkdir(parents=True, exist_ok=True)
    dt = np_dtype(dtype)
    w = hf.ModelWriter(folder, [(n, dt, s) for n, s in shapes.items()],
                       max_shard_bytes or hf.DEFAULT_SHARD_BYTES)
    for n, s in shapes.items():
        w.write(n, make(s).astype(np.float32).astype(dt))
    w.close()
    (folder / "config.json").write_text(json.dumps(hf.model_config(cfg, dtype), indent=2))
    return folder


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return write_tiny_llama(tmp_path / "tiny")


def interrupt_at(monkeypatch, step: int):
    """Make the shared step loop (pissa.training.loop) raise KeyboardInterrupt, as Ctrl-C would, when it
    reaches `step`. Returns the function that undoes it."""
    import pissa.training.loop as loop

    real = loop.lr_at

    def interrupted(at, cfg):
        if at == step:
            raise KeyboardInterrupt
        return real(at, cfg)

    monkeypatch.setattr(loop, "lr_at", interrupted)
    return lambda: monkeypatch.setattr(loop, "lr_at", real)


def pytest_report_header(config):
    return f"pissa backends under test: {', '.join(BACKENDS)}"


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """The reference: transformers' own load of the SmolLM2 GGUF, float32 (about 20 s, once)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    return model.eval()


# Two fixed token sequences of SmolLM2's vocabulary, same length so that they batch.
PROMPT_IDS = [[1, 4093, 314, 260, 3575, 282, 4649, 47, 2, 17], [1, 504, 2722, 5253, 28, 1041, 429, 253, 33, 17]]


def rel_max_diff(a, b) -> float:
    """max|a - b| / max|b|: the relative logits metric used throughout the tests."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2) -> Path:
    """SmolLM2's real tokenizer (with its chat template), as files."""
    folder = tmp_path_factory.mktemp("smol_tok")
    smollm2.save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_base(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny random Llama that speaks SmolLM2's tokenizer (the model itself, before pissa init)."""
    import shutil

    src = write_tiny_llama(tmp_path_factory.mktemp("tiny_chat") / "base", vocab=49152, hidden=64, inter=128)
    for f in smollm2_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return src


@pytest.fixture(scope="session")
def tiny_chat(tiny_chat_base) -> Path:
    """tiny_chat_base after `pissa init` (rank 4): fast enough to train for a few steps in every
    test that needs a run."""
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    run_init(str(tiny_chat_base), tiny_chat_base.parent / "init", AdapterSpec(rank=4), progress=False)
    return tiny_chat_base.parent / "init"


@pytest.fixture(scope="session")
def tiny_mora(tiny_chat_base) -> dict[str, Path]:
    """tiny_chat_base after `pissa init --init mora --rank 4`, per MoRA type. Its shapes cover the
    cases: r_hat dividing nothing, and in > out with L > out (k_proj, v_proj, down_proj)."""
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    out = {}
    for kind in ("sharing", "rotation"):
        out[kind] = tiny_chat_base.parent / f"mora-{kind}"
        run_init(str(tiny_chat_base), out[kind], AdapterSpec(rank=4, kind="mora", options={"mora_type": kind}), progress=False)
    return out


DATA = Path(__file__).resolve().parent.parent / "data" / "arith"


def hf_logits(folder, ids, adapter=None):
    """transformers' float32 logits of a model folder (with a PEFT adapter on it, if given)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor(ids)).logits.numpy()
