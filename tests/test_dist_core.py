"""pissa.dist without processes: the cost-balanced split, the launch environment (mlx issue 3442's
silent group of one is refused), and the commands that refuse to run once per rank."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pissa import dist
from pissa.cli import main
from pissa.errors import PissaError
from pissa.jobs.init import Job
from pissa.jobs.init_ranks import cost
from pissa.adapters.spec import AdapterSpec


def test_assign_is_deterministic_and_within_one_job_of_balance():
    rng = np.random.default_rng(0)
    for size in (2, 3, 8):
        costs = list(rng.pareto(1.5, 200) + 0.1)
        owner = dist.assign(costs, size)
        assert owner == dist.assign(costs, size)
        loads = np.bincount(owner, weights=costs, minlength=size)
        assert loads.max() - loads.min() <= max(costs)
    assert dist.assign([5, 4, 3, 3, 3], 2) == [0, 1, 1, 0, 1]


def test_cost_follows_the_shape_and_the_init(tiny_llama, tmp_path):
    def costs(init):
        job = Job(str(tiny_llama), tmp_path / "out", AdapterSpec(rank=4, init=init), "numpy", None, False, None,
                  None, 1)
        return {step[0].split(".", 3)[-1]: cost(job, step) for step in job.steps if "layers.0." in step[0]}

    full, fast, lora = costs("pissa"), costs("pissa-fast"), costs("lora")
    for c in (full, fast):
        assert c["mlp.gate_proj.weight"] > c["self_attn.q_proj.weight"] > c["self_attn.k_proj.weight"] \
            > c["input_layernorm.weight"]
    # A randomised SVD costs passes over W: 128 x 64 is twice 64 x 64 at the same sketch width.
    assert fast["mlp.gate_proj.weight"] / fast["self_attn.q_proj.weight"] == pytest.approx(2)
    # A full SVD of 64 x 64 costs more than a randomised one; LoRA's init is a copy of any target.
    assert full["self_attn.q_proj.weight"] > fast["self_attn.q_proj.weight"] > lora["self_attn.q_proj.weight"]
    assert lora["mlp.gate_proj.weight"] / lora["self_attn.q_proj.weight"] == pytest.approx(2)


def test_mlx_rank_without_a_hostfile_is_refused(monkeypatch, tmp_path, capsys, tiny_llama):
    """mx.distributed.init() would quietly make every process a group of one (mlx issue 3442)."""
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    assert main(["init", str(tiny_llama), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlx.launch" in err[0] and "3442" in err[0], err
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "missing.json"))
    assert main(["init", str(tiny_llama), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_process_commands_refuse_a_launcher(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["merge", "x", "--adapter", "y", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pissa: error: pissa merge runs in one process, but torchrun started 2: run it without torchrun"]


def test_a_launcher_of_one_process_is_a_plain_run(monkeypatch, tiny_llama, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.launch() == ("torchrun", 0, 1)
    assert main(["init", str(tiny_llama), "--out", str(tmp_path / "out"), "--rank", "2", "--no-progress"]) == 0


def test_the_global_batch_must_cover_every_rank(tiny_chat, tmp_path):
    from pissa.training.loop import prepare
    from pissa.training.run import TrainConfig
    from tests.conftest import DATA

    class Two(dist.Solo):
        size = 2

    with pytest.raises(PissaError, match="--batch-size 1 is the global batch, split over 2 ranks"):
        prepare(tiny_chat, DATA / "train.jsonl", tmp_path / "run", TrainConfig(batch_size=1), backend="torch",
                group=Two())
    assert not (tmp_path / "run").exists()


def test_python_m_pissa_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "pissa", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--shard" in out.stdout and "--dist-timeout" in out.stdout
