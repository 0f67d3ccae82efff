"""GGUF files pissa writes: LoRA adapters for llama.cpp (`pissa convert --format gguf`) and merged
models (`pissa merge ... --out FILE.gguf`), for each architecture pissa reads from GGUF.

Every case starts from a tiny random model written as llama.cpp's converter writes it
(tests/test_gguf_archs.py), runs `pissa init`, moves the factors as training would, and then:
- the LoRA GGUF, read back with gguf.GGUFReader, gives the PEFT LoRA's s*B*A for every module after
  llama.cpp's row permutation, under the metadata llama.cpp reads; and the original model's GGUF
  plus that LoRA, as llama.cpp adds them, is the merged GGUF to within the init's own
  reconstruction error;
- the merged GGUF, read by pissa's reader and by transformers' GGUF loading, is the merged Hugging
  Face folder: bit for bit in f32; in f16, bf16 and q8_0, bit for bit the folder's weights rounded
  by gguf.quants (computed here independently of the writer), and transformers' logits those of
  the folder's model with those rounded weights (1e-5 relative, as f32). The rounding itself moved
  the logits by (measured, max over the six) f16 1.1e-3, bf16 9e-3, q8_0 2.3e-2 relative;
- its tokenizer, loaded by transformers, encodes, decodes and templates as the folder's does.
SmolLM2 is in tests/test_gguf_export_smollm2.py, the rules and refusals one at a time in
tests/test_gguf_export_rules.py, llama.cpp itself in tests/test_gguf_llama_cpp.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.gguf_write import gguf_name, tensor_type
from pissa.files.formats.peft import load_adapter, save_adapter
from pissa.files.loaders import open_model
from pissa.files.loaders.gguf import GGUFSource, unpermute_rows
from pissa.files.loaders.gguf_archs import ARCHS
from tests.conftest import rel_max_diff
from tests.test_gguf_archs import CASES, TEXTS, write_case
from tests.test_loaders import llama_cpp_permute

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TYPES = ("f32", "f16", "bf16", "q8_0")
EPS32 = float(np.finfo(np.float32).eps)
IDS = [[5, 17, 40, 3, 99, 200, 7, 64, 1, 2, 30]]


def run(*argv: str) -> int:
    return main([*argv])


def perturbed(init_dir: Path, out: Path, seed: int = 0) -> Path:
    """The init's adapter moved as training moves it (every factor), saved as a trained adapter."""
    a = load_adapter(init_dir)
    rng = np.random.default_rng(seed)
    a.factors = {m: tuple(p + (0.05 * rng.standard_normal(p.shape)).astype(p.dtype) for p in params)
                 for m, params in a.factors.items()}
    a.info = {"role": "trained", "init_fingerprint": a.info["fingerprint"]}
    out.mkdir(parents=True)
    save_adapter(out, a)
    return out


@dataclass
class Exported:
    name: str
    arch: str
    root: Path
    src: Path          # the original model, as llama.cpp's converter writes it
    init: Path         # pissa init's residual folder (pissa_init inside)
    trained: Path
    config: dict       # the model's config.json fields


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    src = root / "src.gguf"
    case, _ = write_case(request.param, src)
    init = root / "init"
    assert run("init", str(src), "--out", str(init), "--rank", "4", "--dtype", "float32", "--no-progress") == 0
    trained = perturbed(init / "pissa_init", root / "trained")
    lora = ("--initial", str(init / "pissa_init"), "--trained", str(trained))
    assert run("convert", *lora, "--out", str(root / "lora")) == 0
    assert run("convert", *lora, "--out", str(root / "lora.gguf")) == 0
    assert run("merge", str(init), "--adapter", str(trained), "--out", str(root / "merged")) == 0
    for t in TYPES:
        assert run("merge", str(init), "--adapter", str(trained), "--out", str(root / f"merged-{t}.gguf"),
                   "--gguf-type", t) == 0
    return Exported(request.param, case.gguf_arch, root, src, init, trained, open_model(str(init)).config)


def raw(path: Path | gguf.GGUFReader, names=None) -> dict[str, np.ndarray]:
    """The tensors of a GGUF (all, or those named) as stored (llama.cpp's layout), dequantised to
    float32, numpy shapes."""
    from gguf.quants import dequantize

    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    return {t.name: np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors if names is None or t.name in names}


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def llama_cpp_delta(lora: dict[str, np.ndarray], alpha: float, base: str) -> np.ndarray:
    """What llama.cpp adds to the weight `base`: alpha / r * B @ A, r read from B, in float64."""
    A, B = lora[base + ".lora_a"].astype(np.float64), lora[base + ".lora_b"].astype(np.float64)
    return alpha / B.shape[1] * (B @ A)


def as_stored(arch: str, config: dict, name: str, w: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor as llama.cpp's converter stores it (the test's own permutation)."""
    if ARCHS[arch].permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
        return llama_cpp_permute(w, heads)
    if ARCHS[arch].norm_shift and name.endswith("norm.weight"):
        return w + np.float32(1)
    return w


def rounded(arch: str, config: dict, name: str, w: np.ndarray, gguf_type: str) -> np.ndarray:
    """What a reader gets back for `w` written as `gguf_type`: stored, rounded by gguf.quants,
    restored (the reader's unpermute, and the norm shift undone in float32)."""
    from gguf.quants import dequantize, quantize

    stored = as_stored(arch, config, name, w.astype(np.float32))
    t = tensor_type(gguf_name(arch, name), stored.shape, gguf_type)
    back = np.asarray(dequantize(quantize(stored, t), t), np.float32).reshape(stored.shape)
    if ARCHS[arch].permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
        return unpermute_rows(back, heads)
    if ARCHS[arch].norm_shift and name.endswith("norm.weight"):
        return back - np.float32(1)
    return back


# --- LoRA adapters for llama.cpp ---------------------------------------------------------------

def test_lora_gguf_is_the_peft_lora_in_llama_cpp_layout(exported):
    peft = load_adapter(exported.root / "lora")
    meta = fields(exported.root / "lora.gguf")
    assert meta["general.architecture"] == exported.arch
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == peft.spec.alpha == 2 * 4  # rank 2r, alpha doubled
    reader = gguf.GGUFReader(exported.root / "lora.gguf")
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]  # llama.cpp reads a float32
    lora = raw(exported.root / "lora.gguf")
    c = exported.config
    assert set(lora) == {f"{gguf_name(exported.arch, m + '.weight')}.lora_{x}" for m in peft.factors for x in "ab"}
    for m, (A, B) in peft.factors.items():
        want = peft.spec.scale * (B.astype(np.float64) @ A.astype(np.float64))
        if ARCHS[exported.arch].permute_qk and m.endswith(("q_proj", "k_proj")):
            want = llama_cpp_permute(want, c["num_attention_heads"] if "q_proj" in m else c["num_key_value_heads"])
        got = llama_cpp_delta(lora, meta["adapter.lora.alpha"], gguf_name(exported.arch, m + ".weight"))
        # Plain LoRA: the factors are stored as they are (float32), so the products are the same numbers.
        np.testing.assert_array_equal(got, want, err_msg=m)


def test_original_gguf_plus_lora_gguf_is_the_merged_gguf(exported):
    """llama.cpp's sum (base GGUF + alpha/r B A) against pissa merge's GGUF, in the stored layout: they
    differ by the init's reconstruction error W - (W_res + s B0 A0) plus float32 rounding."""
    base, merged = raw(exported.src), raw(exported.root / "merged-f32.gguf")
    lora, alpha = raw(exported.root / "lora.gguf"), fields(exported.root / "lora.gguf")["adapter.lora.alpha"]
    init, residual = load_adapter(exported.init / "pissa_init"), open_model(str(exported.init))
    original = GGUFSource(exported.src)
    assert set(base) == set(merged)
    for name in base:
        if name + ".lora_a" not in lora:
            np.testing.assert_array_equal(merged[name], base[name], err_msg=name)  # untouched tensors pass as they are
            continue
        hf = next(n for n in original.shapes() if gguf_name(exported.arch, n) == name)
        W, W_res = original.get(hf).astype(np.float64), residual.get(hf).astype(np.float64)
        A0, B0 = (p.astype(np.float64) for p in init.factors[hf[: -len(".weight")]])
        recon = np.abs(W - W_res - init.spec.scale * B0 @ A0).max()
        delta = llama_cpp_delta(lora, alpha, name)
        tol = recon + 4 * EPS32 * (np.abs(W).max() + np.abs(delta).max())
        assert np.abs(base[name] + delta - merged[name]).max() <= tol, name


def test_trained_adapter_for_the_residual_gguf(exported, tmp_path):
    """--base residual: the trained adapter itself, for a GGUF of the residual model (pissa merge
    without --adapter); residual + adapter is the merged model to float32 rounding."""
    out, residual = tmp_path / "trained.gguf", tmp_path / "residual.gguf"
    assert run("convert", "--trained", str(exported.trained), "--base", "residual", "--model", str(exported.init),
               "--out", str(out)) == 0
    assert run("merge", str(exported.init), "--out", str(residual), "--gguf-type", "f32") == 0
    base, merged, lora = raw(residual), raw(exported.root / "merged-f32.gguf"), raw(out)
    alpha = fields(out)["adapter.lora.alpha"]
    assert alpha == 4 and {n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")} < set(base)
    for name in base:
        delta = llama_cpp_delta(lora, alpha, name) if name + ".lora_a" in lora else 0.0
        tol = 2 * EPS32 * (np.abs(base[name]).max() + np.abs(delta).max())
        assert np.abs(base[name] + delta - merged[name]).max() <= tol, name


# --- merged models --------------------------------------------------------------------------------

@pytest.mark.parametrize("gguf_type", TYPES)
def test_merged_gguf_is_the_merged_folder_rounded_by_its_type(exported, gguf_type):
    folder = open_model(str(exported.root / "merged"))
    ours = GGUFSource(exported.root / f"merged-{gguf_type}.gguf")
    assert ours.config == GGUFSource(exported.src).config  # the metadata reads as the converter's does
    tied = exported.config.get("tie_word_embeddings") or exported.arch == "gemma2"
    assert set(ours.shapes()) == set(folder.shapes()) - ({"lm_head.weight"} if tied else set())
    for name in ours.shapes():
        want = rounded(exported.arch, exported.config, name, folder.get(name), gguf_type)
        np.testing.assert_array_equal(ours.get(name), want, err_msg=name)


@pytest.mark.slow  # six transformers GGUF loads per architecture, about 2 s
def test_merged_gguf_logits_in_transformers(exported):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(exported.root / "merged", dtype=torch.float32).eval()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
    folder = open_model(str(exported.root / "merged"))
    for t in TYPES:
        model = AutoModelForCausalLM.from_pretrained(exported.root, gguf_file=f"merged-{t}.gguf",
                                                     dtype=torch.float32).eval()
        # The folder's model with the weights the type rounds: what the file should compute.
        with torch.no_grad():
            for name in folder.shapes():
                ref.state_dict()[name].copy_(torch.from_numpy(rounded(exported.arch, exported.config, name,
                                                                      folder.get(name), t)))
            expect = ref(torch.tensor(IDS)).logits.numpy()
            got = model(torch.tensor(IDS)).logits.numpy()
            ref.load_state_dict(state)
        assert rel_max_diff(got, expect) <= 1e-5, t  # measured: 0 for every type and architecture
        if t == "f32":
            assert rel_max_diff(got, want) <= 1e-5  # measured: 0
        else:  # the rounding moved the logits, by the type's precision (2^-11, 2^-8, Q8_0's 1/127 steps)
            assert 0 < rel_max_diff(got, want) < 0.05, t


def test_merged_gguf_tokenizer_is_the_folders(exported):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(exported.root, gguf_file="merged-f32.gguf")
    ref = AutoTokenizer.from_pretrained(exported.root / "merged")
    assert ours.chat_template == ref.chat_template
    messages = [{"role": "user", "content": "the heat"}, {"role": "assistant", "content": "in the thin"}]
    texts = [*TEXTS, ref.apply_chat_template(messages, tokenize=False), ref.eos_token + " the" + ref.bos_token]
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ref(text).input_ids) == ref.decode(ref(text).input_ids), text
    meta = fields(exported.root / "merged-f32.gguf")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert meta[key] == fields(exported.src)[key], key
    if meta["tokenizer.ggml.model"] == "gpt2":
        assert meta["tokenizer.ggml.pre"] == fields(exported.src)["tokenizer.ggml.pre"]
