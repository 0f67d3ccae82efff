"""Full fine-tuning (pissa init --init full; pissa.adapters.kinds.full): one step equals a plain torch AdamW
loop written here, the MLX step equals the torch step, and RUN_DIR/model loads in transformers and
mlx_lm with the trained model's logits."""

from __future__ import annotations

import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.peft import load_adapter
from pissa.files.loaders import open_model
from tests.conftest import DATA, PROMPT_IDS, rel_max_diff

torch = pytest.importorskip("torch")

LR = 1e-3
ARGS = ["--batch-size", "2", "--max-seq-len", "128", "--lr", str(LR), "--warmup-ratio", "0", "--no-progress"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_full(tiny_chat_base):
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    out = tiny_chat_base.parent / "full"
    if not out.exists():
        run_init(str(tiny_chat_base), out, AdapterSpec(kind="full"), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tiny_full, tmp_path_factory):
    out = {}
    for backend in ("torch", "mlx"):
        if backend == "mlx":
            pytest.importorskip("mlx.core")
        out[backend] = tmp_path_factory.mktemp(f"full-{backend}") / "run"
        assert main(["train", str(tiny_full), "--data", str(DATA / "train.jsonl"), "--out", str(out[backend]),
                     "--steps", "1", "--save-at", "1", "--backend", backend, *ARGS]) == 0
    return out


def plain_torch_step(model_dir) -> dict[str, np.ndarray]:
    """One AdamW step written out with torch and transformers alone: the same first batch, the
    mean token loss over the completion, clipping at 1.0, AdamW(lr, betas 0.9/0.999, eps 1e-8,
    no weight decay) on the target linear weights only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_batches import batch_indices

    from pissa.training.data import collate, load_dataset

    from pissa.files.tokenizer import pad_id

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset(DATA / "train.jsonl", tokenizer, 128)
    batch = collate([data.examples[i] for i in batch_indices(len(data.examples), 2, 0, 0)], pad_id(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    trained = {n: p for n, p in model.named_parameters() if n.endswith(tuple(f"{t}.weight" for t in TARGETS))}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(trained.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids, labels = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"])
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
    opt.step()
    return {n: p.detach().numpy().copy() for n, p in trained.items()}


def test_one_step_equals_a_plain_adamw_step(runs, tiny_full):
    want = plain_torch_step(tiny_full)
    got = open_model(str(runs["torch"] / "model"))
    base = open_model(str(tiny_full))
    assert len(want) == 14
    # Adam's first step moves a weight by lr * g / (|g| + eps), eps = 1e-8. pissa's loss runs the
    # head over the labelled positions only, in chunks, so its gradients round differently from
    # this plain full-logits loss; that shows only where |g| is near eps (measured: 5 of 73728
    # entries off by more than 1e-3 lr, all with |g| < 8e-9, the worst 1.8e-3 lr). So: every entry
    # within 1e-2 lr (a flipped sign would be 2 lr), and those with |g| > 100 eps (a step above
    # 0.99 lr: 96% or more of each weight's entries) within 1e-4 lr (measured 1.5e-5 lr: two
    # float32 ulps of the weight).
    for name, w in want.items():
        step = np.abs(w - base.get(name))
        assert step.max() > LR / 2, name   # Adam's first step moves a weight by about lr
        diff = np.abs(got.get(name) - w)
        assert diff.max() <= 1e-2 * LR, name
        assert (step > 0.99 * LR).mean() > 0.9 and diff[step > 0.99 * LR].max() <= 1e-4 * LR, name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(got.get(name), base.get(name))   # only the targets train


def test_the_mlx_step_equals_the_torch_step(runs, tiny_full):
    # Adam's first step moves each weight by lr * g / (|g| + eps), eps = 1e-8: +-lr wherever the
    # gradient is well above eps, whatever its rounding. Only where |g| is itself near eps does a
    # float32 rounding difference between the backends' gradients move the update visibly
    # (measured: 1 of 24576 entries, 1.2e-6 = 1e-3 lr). So: all within lr of each other (a flipped
    # sign would be 2 lr), and all but 1e-4 of them within 1e-3 lr.
    a, b = open_model(str(runs["torch"] / "model")), open_model(str(runs["mlx"] / "model"))
    base = open_model(str(tiny_full))
    off, total = 0, 0
    for name in a.shapes():
        diff = np.abs(a.get(name) - b.get(name))
        assert diff.max() <= LR, name
        if np.abs(a.get(name) - base.get(name)).max() > 0:
            off, total = off + int((diff > 1e-3 * LR).sum()), total + diff.size
    assert total > 0 and off <= 1e-4 * total, (off, total)


def test_the_run_writes_a_model_that_transformers_and_mlx_lm_load(runs, tiny_full):
    from transformers import AutoModelForCausalLM

    import pissa_torch

    run = runs["torch"]
    assert not (run / "adapter").exists() and not (run / "lora").exists()
    checkpoint = load_adapter(run / "checkpoints" / "step-000001" / "adapter")
    assert checkpoint.spec.kind == "full" and len(checkpoint.factors) == 14
    trained, _ = pissa_torch.load(tiny_full, run / "checkpoints" / "step-000001" / "adapter")
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        ours = trained(ids).logits.numpy()
        hf = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)(ids).logits.numpy()
        start = AutoModelForCausalLM.from_pretrained(tiny_full, dtype=torch.float32)(ids).logits.numpy()
    assert rel_max_diff(hf, ours) < 1e-6 and rel_max_diff(start, ours) > 1e-4
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load

    model, _ = load(str(run / "model"))
    assert rel_max_diff(np.array(model(mx.array(PROMPT_IDS))), ours) < 1e-5


def test_convert_refuses_full_fine_tuning(runs, tmp_path, capsys):
    rc = main(["convert", "--trained", str(runs["torch"] / "checkpoints" / "step-000001" / "adapter"),
               "--out", str(tmp_path / "lora")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "no LoRA holds" in err[-1] and not (tmp_path / "lora").exists()
