"""The `pissa` command as a user runs it: bad input gives one line, exit code 2, no traceback, no output."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pissa.cli import build_parser, main
from pissa.errors import PissaError
from tests.conftest import BACKENDS, write_tiny_llama

PISSA = str(Path(sys.executable).parent / "pissa")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PISSA, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_failure(proc: subprocess.CompletedProcess, words: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pissa: error: ") and words in err, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")


def _unsupported_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    # Q5_K: a real llama.cpp type that pissa does not dequantise; raw_shape is in bytes (one 176-byte block = 256 values).
    w.add_tensor("blk.0.attn_q.weight", np.zeros((1, 176), np.uint8), raw_shape=(1, 176),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


BAD = {
    "missing model": (lambda t, d: ["/no/such/model"], "not found"),
    "folder that is not a model": (lambda t, d: [str(d)], "is not a model folder"),
    "file that is not a model": (lambda t, d: [str(_text(d))], "is not a model"),
    "truncated safetensors": (lambda t, d: [str(_truncated_folder(t, d))], "truncated or corrupt"),
    "rank zero": (lambda t, d: [str(t), "--rank", "0"], "argument --rank: expected an integer >= 1, got '0'"),
    "rank negative": (lambda t, d: [str(t), "--rank=-4"], "argument --rank: expected an integer >= 1, got '-4'"),
    "rank too large": (lambda t, d: [str(t), "--rank", "40"], "rank 40 exceeds min(out, in)"),
    "alpha zero": (lambda t, d: [str(t), "--alpha", "0"], "alpha must be > 0"),
    "alpha negative": (lambda t, d: [str(t), "--alpha=-1"], "alpha must be > 0"),
    "targets match nothing": (lambda t, d: [str(t), "--targets", "qkv_proj"], "match no linear layer"),
    "unknown init": (lambda t, d: [str(t), "--init", "bogus"], "unknown init 'bogus'"),
    "unknown backend": (lambda t, d: [str(t), "--backend", "jax"], "unknown backend 'jax'"),
    "unknown flag": (lambda t, d: [str(t), "--rnak", "4"], "unrecognized arguments: --rnak"),
}


def _text(d: Path) -> Path:
    p = d / "notes.txt"
    p.write_text("hello")
    return p


def _truncated_folder(tiny: Path, d: Path) -> Path:
    bad = d / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny / "config.json").read_text())
    _truncated(tiny / "model.safetensors", bad / "model.safetensors", 0.6)
    return bad


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, tiny, tmp_path):
    make, words = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    proc = run("init", *make(tiny, work), "--out", str(out))
    assert_clean_failure(proc, words)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_non_empty_out_without_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("init", str(tiny), "--out", str(out), "--rank", "4")
    assert_clean_failure(proc, "is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unsupported_gguf_type(tmp_path):
    proc = run("init", str(_unsupported_gguf(tmp_path / "odd.gguf")), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "Q5_K")
    assert not (tmp_path / "out").exists()


def test_gguf_architecture_pissa_does_not_read(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")  # transformers loads it; pissa does not
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = run("init", str(path), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "architecture 'falcon', which pissa does not read; it reads llama (also Mistral), "
                               "qwen2, qwen3, gemma2, gemma3, phi3")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_gguf(smollm2_path, tmp_path, keep):
    bad = _truncated(smollm2_path, tmp_path / "cut.gguf", keep)
    proc = run("init", str(bad), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    proc = run("init", str(bad), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "truncated or corrupt")


def test_success_prints_progress_and_one_summary_line(tiny, tmp_path):
    proc = run("init", str(tiny), "--out", str(tmp_path / "out"), "--rank", "4", "--init", "pissa-fast")
    assert proc.returncode == 0, proc.stderr
    assert "14/14" in proc.stderr  # the progress bar over the matrices
    line, = proc.stdout.strip().splitlines()
    assert "decomposed 14 matrices" in line and "trainable parameters" in line and "peak memory" in line


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("args, words", [
    (["eval", "nonexist", "--data", "d.jsonl"], "model 'nonexist' not found"),
    (["generate", "nonexist", "--prompt", "hi"], "model 'nonexist' not found"),
    (["eval", "nonexist", "--data", "d.jsonl", "--adapter", "nonexist"], "model 'nonexist' not found"),
    (["generate", "empty", "--prompt", "hi"], "empty is not a model folder (no config.json)"),
])
def test_eval_and_generate_without_a_model_are_one_line(args, words, backend, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main([*args, "--backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pissa: error: ") and words in err, err


@pytest.fixture(scope="module")
def init_without_tokenizer(tiny, tmp_path_factory) -> Path:
    """A pissa init folder of a model saved without tokenizer files (write_tiny_llama writes none)."""
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    out = tmp_path_factory.mktemp("notok") / "init"
    run_init(str(tiny), out, AdapterSpec(rank=2), progress=False)
    return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_a_model_without_a_tokenizer_is_one_line(command, backend, init_without_tokenizer, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    extra = {"train": ["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"],
             "eval": ["--data", str(data), "--no-progress"], "generate": ["--prompt", "hi"]}[command]
    assert main([command, str(init_without_tokenizer), *extra, "--backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pissa: error: ") and "has no tokenizer files" in err, err
    assert not (tmp_path / "run").exists()


# Integer options where 0 means "none" or "off"; every other integer option must be >= 1.
NON_NEGATIVE = {("init", "--niter"), ("init", "--oversampling"), ("init", "--seed"),
                ("train", "--seed"), ("train", "--eval-every"), ("train", "--save-every"),
                ("train", "--keep-checkpoints"), ("compare", "--probe-limit")}
REQUIRED = {"init": ["m", "--out", "o"], "train": ["m", "--data", "d", "--out", "o"], "eval": ["m", "--data", "d"],
            "generate": ["m", "--prompt", "p"], "merge": ["m", "--adapter", "a", "--out", "o"],
            "convert": ["--initial", "i", "--trained", "t", "--out", "o"], "compare": ["m", "--out", "o"]}


def _options() -> list[tuple[str, argparse.Action]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(command, action) for command, parser in sub.choices.items() for action in parser._actions]


def _integer_options() -> list[tuple[str, str]]:
    from pissa import cli

    return sorted((command, action.option_strings[0]) for command, action in _options()
                  if action.type in (cli._positive_int, cli._non_negative_int))


def test_every_integer_option_is_checked():
    assert not [(c, a.dest) for c, a in _options() if a.type is int]  # a new one must pick >= 1 or >= 0
    found = _integer_options()
    assert set(NON_NEGATIVE) <= set(found) and ("eval", "--limit") in found and ("init", "--rank") in found


@pytest.mark.parametrize("command, option", _integer_options())
def test_integer_options_refuse_what_they_cannot_mean(command, option):
    parse = build_parser().parse_args
    smallest = 0 if (command, option) in NON_NEGATIVE else 1
    assert getattr(parse([command, *REQUIRED[command], option, str(smallest)]), option[2:].replace("-", "_")) == smallest
    with pytest.raises(PissaError, match=f"argument {option}: expected an integer >= {smallest}, got '{smallest - 1}'"):
        parse([command, *REQUIRED[command], option, str(smallest - 1)])
    with pytest.raises(PissaError, match=f"argument {option}: expected an integer, got 'two'"):
        parse([command, *REQUIRED[command], option, "two"])


def test_a_negative_limit_is_one_line(capsys):
    # It used to pass, and eval silently dropped the last record (records[:-1]).
    assert main(["eval", "m", "--data", "d.jsonl", "--limit", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pissa: error: argument --limit: expected an integer >= 1, got '-1' (see: pissa eval --help)"
