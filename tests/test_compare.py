"""`pissa compare` on a tiny grid (tiny model, two methods, two learning rates, four steps): every
output file is written, and results.jsonl agrees with an independent computation: the target
loss, the general-text loss and the KL recomputed with plain transformers on the merged
checkpoints, and the probe's accuracy recomputed from the scored options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.cli import main
from tests.conftest import DATA

torch = pytest.importorskip("torch")

GRID = ["--methods", "lora,full", "--lrs", "1e-3,1e-2", "--steps", "4", "--eval-at", "2,4", "--eval-limit", "4",
        "--general-tokens", "300", "--probe-limit", "12", "--max-seq-len", "128", "--batch-size", "2", "--no-progress"]


def compare(model, out, *extra, backend="torch") -> int:
    return main(["compare", str(model), "--data", str(DATA / "train.jsonl"), "--eval-data", str(DATA / "eval.jsonl"),
                 "--out", str(out), *GRID, "--backend", backend, *extra])


@pytest.fixture(scope="module")
def grid(tiny_chat_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    assert compare(tiny_chat_base, out, "--keep-checkpoints") == 0  # the tests below merge them
    return out


@pytest.mark.slow
def test_the_new_methods_run_and_measured_checkpoints_go(tiny_chat_base, tmp_path):
    """DoRA, OLoRA and MiLoRA through a small pissa compare; each run's checkpoints are deleted once
    measured (a sweep used to keep them all: 17 GB for the smollm2 preset), its spectrum stays."""
    out = tmp_path / "out"
    assert main(["compare", str(tiny_chat_base), "--data", str(DATA / "train.jsonl"), "--eval-data",
                 str(DATA / "eval.jsonl"), "--out", str(out), "--methods", "dora,olora,milora", "--lrs", "1e-2",
                 "--ranks", "4", "--steps", "2", "--eval-at", "2", "--eval-limit", "2", "--general-tokens", "100",
                 "--probe-limit", "4", "--max-seq-len", "96", "--batch-size", "2", "--no-progress"]) == 0
    got = rows(out)
    assert {r["method"] for r in got if r["step"] == 2 and "target_loss" in r} == {"dora", "olora", "milora"}
    for run in (out / "runs").iterdir():
        if run.is_dir():
            assert not (run / "checkpoints").exists() and (run / "spectrum.json").is_file(), run
    assert "## Rank of the weight change" in (out / "report.md").read_text()


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_every_output_file(grid):
    for name in ("results.jsonl", "pareto.png", "lr.png", "report.md", "compare.json"):
        assert (grid / name).is_file(), name
    assert (grid / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    report = (grid / "report.md").read_text()
    for words in ("## After 4 steps", "## Best setting per method", "## Rank of the weight change", "![pareto.png]",
                  "LoRA learns"):
        assert words in report, words
    got = rows(grid)
    assert len(got) == 4 * 3 and {(r["method"], r["lr"]) for r in got} == {
        (m, lr) for m in ("lora", "full") for lr in (1e-3, 1e-2)}
    trained = [r for r in got if r["step"] > 0]
    assert all(r["peak_mib"] > 100 and r["tokens_per_s"] > 0 for r in trained)


def test_kl_is_zero_untrained_and_positive_after(grid):
    for r in rows(grid):
        if r["step"] == 0:
            assert r["general_kl"] == 0.0, r   # LoRA's B = 0 and full's unchanged weights: the same model
        else:
            assert r["general_kl"] > 0, r


def general_texts(tokenizer, budget, seq_len=256):
    """The first `budget` tokens of the shipped general text, cut to 256 tokens per record (read
    straight from the file, not through pissa.studies.forgetting)."""
    from pissa.studies.forgetting import GENERAL

    out, total = [], 0
    for line in GENERAL.read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"])["input_ids"][:seq_len][: max(2, budget - total)]
        out.append(ids)
        total += len(ids)
        if total >= budget:
            return out


def test_results_agree_with_transformers(grid, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pissa.jobs.merge import run_merge

    base_dir = grid / "inits" / "full"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    texts = general_texts(tokenizer, 300)
    records = [json.loads(line) for line in (DATA / "eval.jsonl").read_text().splitlines()[:4]]
    for r in rows(grid):
        if r["step"] != 4 or r["lr"] != 1e-2:
            continue
        name = "full-lr0.01" if r["method"] == "full" else "lora-r16-lr0.01"
        init = grid / "inits" / ("full" if r["method"] == "full" else "lora-r16")
        merged = tmp_path / name
        run_merge(str(init), grid / "runs" / name / "checkpoints" / "step-000004" / "adapter", merged, progress=False)
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        nll = kl = count = 0.0
        with torch.no_grad():
            for ids in texts:
                x = torch.tensor([ids])
                logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
                logq = torch.log_softmax(base(x).logits[0, :-1].double(), -1)
                nll -= logp[torch.arange(len(ids) - 1), x[0, 1:]].sum().item()
                kl += (logq.exp() * (logq - logp)).sum().item()
                count += len(ids) - 1
            t_nll = t_count = 0.0
            for rec in records:
                messages = rec["messages"]
                context = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(messages, tokenize=False)
                ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
                tgt = tokenizer(full[len(context):], add_special_tokens=False)["input_ids"]
                x = torch.tensor([(ctx + tgt)[:128]])
                logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
                positions = torch.arange(len(ctx) - 1, x.shape[1] - 1)
                t_nll -= logp[positions, x[0, positions + 1]].sum().item()
                t_count += len(positions)
        # float32 forwards on both sides, summed in float64: agreement to ~1e-6 relative.
        assert r["general_loss"] == pytest.approx(nll / count, rel=1e-5), name
        assert r["general_kl"] == pytest.approx(kl / count, rel=1e-3, abs=1e-7), name
        assert r["target_loss"] == pytest.approx(t_nll / t_count, rel=1e-5), name


def test_probe_accuracy_from_the_scored_options(grid):
    for r in rows(grid):
        name = "full-lr" if r["method"] == "full" else "lora-r16-lr"
        saved = json.loads((grid / "runs" / f"{name}{r['lr']:g}" / "probe_scores.json").read_text())
        scores, items = saved["scores"][str(r["step"])], saved["items"]
        assert len(items) == 12 and all(len(s) == len(i["options"]) for s, i in zip(scores, items))
        right = sum(int(np.argmax(s)) == item["answer"] for s, item in zip(scores, items))
        assert r["probe_accuracy"] == right / len(items)


def test_a_second_run_reuses_finished_runs(grid, tiny_chat_base, capsys):
    before = {p: p.stat().st_mtime_ns for p in (grid / "runs").glob("*/done.json")}
    assert len(before) == 4
    assert compare(tiny_chat_base, grid) == 0
    assert {p: p.stat().st_mtime_ns for p in (grid / "runs").glob("*/done.json")} == before
    assert compare(tiny_chat_base, grid, "--steps", "3", "--eval-at", "3") == 2
    assert "holds a compare run with other settings" in capsys.readouterr().err


def test_mlx_end_to_end(tiny_chat_base, tmp_path):
    pytest.importorskip("mlx.core")
    out = tmp_path / "mlx"
    assert main(["compare", str(tiny_chat_base), "--data", str(DATA / "train.jsonl"), "--eval-data",
                 str(DATA / "eval.jsonl"), "--out", str(out), "--methods", "mora", "--lrs", "1e-2", "--steps", "2",
                 "--eval-limit", "2", "--general-tokens", "128", "--probe-limit", "4", "--max-seq-len", "128",
                 "--batch-size", "2", "--backend", "mlx", "--no-progress"]) == 0
    got = rows(out)
    assert [r["step"] for r in got] == [0, 1, 2] and got[0]["general_kl"] == 0.0 < got[-1]["general_kl"]
    assert (out / "report.md").is_file() and (out / "lr.png").is_file()


@pytest.mark.parametrize("argv, words", [
    (["--methods", "bogus"], "unknown method 'bogus'; choose an init"),
    (["--lrs", "fast"], "--lrs takes comma-separated floats"),
    (["--eval-at", "9"], "--eval-at steps must lie in 1..--steps (4)"),
])
def test_bad_input(tiny_chat_base, tmp_path, capsys, argv, words):
    assert compare(tiny_chat_base, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and len(err) == 1


def _kl_reference(ref_logits, logits):
    """KL(softmax(ref) || softmax(logits)) per position, in float64 numpy."""
    def log_softmax(a):
        a = a.astype(np.float64)
        m = a.max(-1, keepdims=True)
        return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))
    lq, lp = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lq) * (lq - lp)).sum(-1)


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_kl_is_finite_and_right_far_from_the_base_and_near_it(backend):
    """The KL every backend computes (pissa.numeric.kl over its Ops) against float64 numpy, for a
    model close to its reference (where the precise form matters: KL ~1e-6) and one whose logits
    differ by hundreds (a diverged full fine-tune at a high learning rate gave NaN before: e^d
    overflowed)."""
    from pissa.numeric.kl import kl_per_position
    from pissa.numeric.ops import get_ops
    from tests.conftest import BACKENDS

    if backend not in BACKENDS:
        pytest.skip(f"needs {backend}")
    ops = get_ops(backend, "cpu")
    rng = np.random.default_rng(0)
    vocab, T = 4096, 6
    base = rng.normal(0, 3, (1, T, vocab)).astype(np.float32)
    near = base + rng.normal(0, 1e-3, base.shape).astype(np.float32)
    far = base.copy()
    far[0, :, :5] += 400.0     # the model puts everything on tokens the reference never picks
    for model_logits, rtol in ((near, 1e-3), (far, 1e-5)):
        kl = kl_per_position(ops.asarray(base, "float32"), ops.asarray(model_logits, "float32"), ops)
        want = _kl_reference(base[0], model_logits[0])
        assert kl.shape == (1, T) and np.isfinite(kl).all(), kl
        assert kl[0].astype(np.float64).sum() == pytest.approx(want.sum(), rel=rtol), (kl, want)
    assert (kl_per_position(ops.asarray(base, "float32"), ops.asarray(base, "float32"), ops) == 0).all()


def test_the_shapes_are_said_as_the_rows_show_them():
    """report.md's sentences on the published shapes follow the numbers, including the high-lr
    case where PiSSA learns more than LoRA but forgets more."""
    from types import SimpleNamespace

    from pissa.studies.report import shapes

    def row(method, lr, loss, kl, em=0.5, probe=1.0):
        return {"method": method, "rank": None if method == "full" else 16, "lr": lr, "step": 60,
                "target_loss": loss, "general_kl": kl, "target_exact_match": em, "probe_accuracy": probe}

    rows = [row("pissa", 2e-5, 0.2, 0.01), row("lora", 2e-5, 0.8, 0.001), row("full", 2e-5, 0.1, 0.02),
            row("pissa", 5e-4, 0.3, 0.4), row("lora", 5e-4, 0.1, 0.05), row("full", 5e-4, 0.2, 0.9, probe=0.7)]
    notes = shapes(rows, SimpleNamespace(steps=60, ranks=[16]))
    assert notes[0].startswith("- lr 2e-05: PiSSA ahead of LoRA") and "forgets more (general KL 0.01000" in notes[0]
    assert notes[1].startswith("- lr 0.0005: PiSSA behind LoRA") and "forgets more" in notes[1]
    assert notes[2].startswith("- lr 2e-05: LoRA learns less") and "forgets less" in notes[2]
    assert notes[3].startswith("- lr 0.0005: LoRA learns more") and "forgets less" in notes[3] and "70.0%" in notes[3]
