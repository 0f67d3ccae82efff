"""Runs shared by the MLX test files: one short training run per backend on `tiny_chat`, with
the same options, so that files can compare them and convert them."""

from __future__ import annotations

import pytest

from tests.conftest import DATA

FAST = ["--batch-size", "2", "--max-seq-len", "128", "--no-progress"]
# The run every file compares against: 8 steps, eval and a checkpoint every 4.
RUN = ["--steps", "8", "--eval-every", "4", "--save-every", "4", "--lr", "3e-3"]


@pytest.fixture(scope="session")
def small_eval(tmp_path_factory):
    """The first 16 records of the eval split: the eval loss over a 49k vocabulary is the slow part
    of a tiny run (MLX's exp on the CPU is scalar)."""
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join((DATA / "eval.jsonl").read_text().splitlines(keepends=True)[:16]))
    return path


def run_cli(backend: str, model, out, *extra, data=DATA / "train.jsonl") -> int:
    from pissa.cli import main

    return main(["train", str(model), "--data", str(data), "--out", str(out), *FAST, "--backend", backend, *extra])


@pytest.fixture(scope="session")
def mlx_run(tiny_chat, small_eval, tmp_path_factory):
    pytest.importorskip("mlx.core")
    out = tmp_path_factory.mktemp("mlx_run") / "run"
    assert run_cli("mlx", tiny_chat, out, "--eval-data", str(small_eval), *RUN) == 0
    return out


@pytest.fixture(scope="session")
def torch_run(tiny_chat, small_eval, tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("torch_run") / "run"
    assert run_cli("torch", tiny_chat, out, "--eval-data", str(small_eval), *RUN) == 0
    return out
