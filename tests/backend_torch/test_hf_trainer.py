"""transformers' Trainer on pissa_torch.load()'s model: every kind and QPiSSA's nf4 residual train,
each Trainer save writes the PEFT adapter with pissa's init fingerprint (not the whole model), and
`pissa convert` / `pissa merge` take it; and the README's example runs as written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pissa import AdapterSpec  # noqa: E402
from pissa.cli import main  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.jobs.init import run_init  # noqa: E402
from tests.conftest import rel_max_diff  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"lora": AdapterSpec(rank=4), "dora": AdapterSpec(rank=4, kind="dora"),
         "mora": AdapterSpec(rank=4, kind="mora"), "full": AdapterSpec(rank=4, kind="full"), "nf4": AdapterSpec(rank=4)}


def records(n: int = 16) -> list[dict]:
    return [{"input_ids": [(7 * i + j) % 128 for j in range(12)], "labels": [(7 * i + j) % 128 for j in range(12)]}
            for i in range(n)]


def trainer(model, out: Path, steps: int = 4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             logging_steps=1)
    return Trainer(model=model, args=args, train_dataset=records())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from tests.conftest import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("hf-trainer") / "base")


@pytest.mark.parametrize("kind", list(KINDS))
def test_trainer_trains_and_saves_the_adapter(kind, base, tmp_path):
    from pissa_torch import load

    init = tmp_path / "init"
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
        from pissa.numeric.quant import scheme

        run_init(str(base), init, KINDS[kind], quantize=scheme("nf4", 64), quant_iters=1, progress=False)
    else:
        run_init(str(base), init, KINDS[kind], progress=False)
    model, spec = load(init)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = trainer(model, tmp_path / "run").train()
    assert np.isfinite(result.training_loss)
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad), "nothing trained"
    ckpt = tmp_path / "run" / "checkpoint-4"
    # The adapter, as PEFT's Trainer checkpoints hold theirs; no frozen weights under pissa's names.
    assert {"adapter_config.json", "adapter_model.safetensors", "pissa_config.json"} <= {p.name for p in ckpt.iterdir()}
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as f:  # what the Trainer's resume reads
        assert set(f.keys()) == {n for n, p in model.named_parameters() if p.requires_grad}
    saved, init_adapter = load_adapter(ckpt), load_adapter(init / "pissa_init")
    assert saved.info["role"] == "trained" and saved.info["init_fingerprint"] == init_adapter.info["fingerprint"]
    # float32 master weights, so loading the checkpoint gives the trained model exactly.
    again, _ = load(init, adapter=ckpt)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert rel_max_diff(again(ids).logits.numpy(), model(ids).logits.numpy()) == 0
    lora = ("--initial", str(init / "pissa_init"), "--trained", str(ckpt))
    if kind in ("lora", "nf4", "mora"):  # the kinds with an exact LoRA (MoRA: the default sharing type)
        assert main(["convert", *lora, "--out", str(tmp_path / "lora")]) == 0
    else:
        assert main(["merge", str(init), "--adapter", str(ckpt), "--out", str(tmp_path / "merged")]) == 0


def test_resume_from_a_trainer_checkpoint(base, tmp_path, caplog):
    """train(resume_from_checkpoint=CKPT) on a freshly loaded model ends where one run ends, and
    lists no missing keys."""
    from pissa_torch import load

    run_init(str(base), tmp_path / "init", AdapterSpec(rank=4), progress=False)
    whole, _ = load(tmp_path / "init")
    trainer(whole, tmp_path / "whole").train()
    first, _ = load(tmp_path / "init")
    trainer(first, tmp_path / "split", steps=4).train()  # its checkpoint-2 is where the second run resumes
    ckpt = tmp_path / "split" / "checkpoint-2"
    shutil.rmtree(tmp_path / "split" / "checkpoint-4")
    resumed, _ = load(tmp_path / "init")
    trainer(resumed, tmp_path / "split").train(resume_from_checkpoint=str(ckpt))
    assert "missing keys" not in caplog.text
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def readme_example() -> tuple[list[str], str]:
    """The README's Trainer example: its shell lines (the python heredoc replaced by its code)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- trainer-example -->\n```bash\n(.*?)```", text, re.S).group(1)
    code = re.search(r"python - <<'EOF'\n(.*?)\nEOF\n", block, re.S).group(1)
    lines = [line for line in re.sub(r"python - <<'EOF'\n.*?\nEOF\n", "", block, flags=re.S).splitlines()
             if line.strip() and not line.startswith("#")]
    return lines, code


@pytest.mark.slow  # trains 20 steps of a tiny model: about 8 s
def test_readme_trainer_example_runs(tiny_chat, tmp_path, monkeypatch):
    lines, code = readme_example()
    assert lines[0].startswith("pissa init smollm2-135m --out out/smollm2-hf")
    # The same commands on the tiny model that speaks SmolLM2's tokenizer, into tmp_path.
    paths = {"out/smollm2-hf": str(tiny_chat), "out/hf-run": str(tmp_path / "hf-run"),
             "out/hf-lora": str(tmp_path / "hf-lora")}

    def local(s: str) -> str:
        for old, new in paths.items():
            s = s.replace(old, new)
        return s

    monkeypatch.chdir(ROOT)  # the example reads data/arith as the README runs it, from the repo root
    exec(compile(local(code), "README.md", "exec"), {"__name__": "__main__"})
    for line in lines[1:]:
        argv = local(line).split()
        assert argv[0] == "pissa" and main(argv[1:]) == 0, line
    assert json.loads((tmp_path / "hf-run" / "checkpoint-20" / "pissa_config.json").read_text())["role"] == "trained"
