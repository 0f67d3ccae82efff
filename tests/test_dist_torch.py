"""pissa init and train across 2 CPU processes with torch.distributed (gloo): under torchrun, init
byte for byte as one process, DDP and FSDP2 training with one process's losses and adapter; started
by hand, a rank killed mid-run fails its peer with one line, and the checkpoint resumes in one
process to the same end. Every job starts its 2 processes once (tests/dist_worker.py)."""

from __future__ import annotations

import json
import signal
import time

import pytest

pytest.importorskip("torch")

from pissa.cli import main  # noqa: E402
from pissa.jobs.init import run_init  # noqa: E402
from pissa.numeric.quant import scheme  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from tests.dist_jobs import (EDGE_TRAIN, EDGES, SEQ, TRAIN, compare_runs, five_records, launch,  # noqa: E402
                             leftovers, same_folders, small_data, start_by_hand, wait_until)

pytestmark = pytest.mark.slow

# The init the API test writes with both: bf16 storage, QPiSSA int8 (its report crosses ranks),
# and shards small enough that the residual model spans several files and an index.
API_INIT = {"spec": {"rank": 4, "init": "pissa-fast", "dtype": "bfloat16"}, "max_shard_bytes": 150_000}


def api_init(model, out, **kw):
    spec = AdapterSpec(**kw["spec"])
    run_init(str(model), out, spec, progress=False, max_shard_bytes=kw["max_shard_bytes"],
             quantize=scheme("int8", 64))


def train_argv(model, out, data, *extra):
    return ["train", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--out", str(out),
            "--backend", "torch", *TRAIN, *extra]


def edge_argv(model, out, five, edge, *extra):
    return ["train", str(model), "--data", str(five), "--out", str(out), "--backend", "torch", *EDGE_TRAIN,
            *EDGES[edge], *extra]


@pytest.fixture(scope="module")
def job(tiny_chat_base, tiny_chat, tmp_path_factory):
    """One torchrun job of 2 ranks: two inits (CLI; API with QPiSSA and shards), an init that fails
    on rank 1, a DDP run and an FSDP2 run. The single-process inits are written first to the same
    --out paths (then moved aside), since the adapter config records --out."""
    root = tmp_path_factory.mktemp("dist_torch")
    data = small_data(root / "data")
    cli_init = ["init", str(tiny_chat_base), "--out", str(root / "cli"), "--rank", "4", "--no-progress"]
    assert main(cli_init) == 0
    (root / "cli").rename(root / "cli-one")
    api_init(tiny_chat_base, root / "api", **API_INIT)
    (root / "api").rename(root / "api-one")
    one = root / "one"
    assert main(train_argv(tiny_chat, one, data)) == 0
    five = five_records(root / "data")
    for edge in EDGES:
        assert main(edge_argv(tiny_chat, root / f"one-{edge}", five, edge)) == 0
    api = {"model": str(tiny_chat_base), "out": str(root / "api"), "quantize": ["int8", 64], **API_INIT}
    start = time.perf_counter()
    results = launch("torchrun", root / "job", [
        {"argv": cli_init},
        {"run_init": api},
        {"argv": ["init", str(tiny_chat_base), "--out", str(root / "failed"), "--rank", "4", "--no-progress"],
         "hook": {"rank": 1, "fail_init": True}},
        {"argv": train_argv(tiny_chat, root / "ddp", data)},
        {"argv": train_argv(tiny_chat, root / "fsdp", data, "--shard")},
        *({"argv": edge_argv(tiny_chat, root / f"{mode}-{edge}", five, edge, *flags)}
          for edge in EDGES for mode, flags in (("ddp", ()), ("fsdp", ("--shard",)))),
    ])
    print(f"torchrun job: {time.perf_counter() - start:.1f} s")
    return root, data, one, results


def test_init_across_ranks_is_byte_identical(job):
    root, _, _, results = job
    assert [r[0]["rc"] for r in results] == [0, 0] and [r[1]["rc"] for r in results] == [0, 0]
    same_folders(root / "cli-one", root / "cli")
    same_folders(root / "api-one", root / "api")
    assert len(list((root / "api").glob("model-*.safetensors"))) > 1
    assert (root / "api" / "quant_report.json").exists()


def test_init_failing_on_one_rank_leaves_nothing_and_says_so_once(job):
    root, _, _, results = job
    assert [r[2]["rc"] for r in results] == [2, 2]
    lines = [line for r in results for line in r[2]["stderr"].splitlines() if line.startswith("pissa: error:")]
    assert lines == ["pissa: error: rank 1 failed on purpose"], results
    assert not (root / "failed").exists() and leftovers(root) == []


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process(job, mode):
    root, _, one, results = job
    index = 3 if mode == "ddp" else 4
    assert [r[index]["rc"] for r in results] == [0, 0], results[0][index]["stderr"][-2000:]
    compare_runs(one, root / mode)
    config = json.loads((root / mode / "config.json").read_text())
    assert config["ranks"] == 2 and config.get("shard", False) == (mode == "fsdp")
    for rel in ("lora/adapter_model.safetensors", "loss.png", "checkpoints/step-000004/optimizer.pt"):
        assert (root / mode / rel).exists(), rel
    assert leftovers(root / mode) == [] and leftovers(root / mode / "checkpoints") == []


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_an_epoch_ending_on_fewer_rows_than_ranks_trains_as_one_process(job, tiny_chat, edge, mode):
    """Five records, 2 ranks, global batch 2, 2 micro-batches a step: the epoch's last micro-batch has
    one row (rank 1 gets a filler without labels), the last step of --epochs 1 is short and must still
    sync, and with --epochs 2 a step spans the epoch's end. It once crashed on rank 1's empty batch."""
    from pissa.training.data import load_dataset
    from pissa.files.tokenizer import load_tokenizer

    root, _, _, results = job
    assert all(len(e.input_ids) > SEQ // 2 for e in load_dataset(root / "data" / "five.jsonl",
                                                                  load_tokenizer(tiny_chat), SEQ).examples)
    index = 5 + 2 * list(EDGES).index(edge) + (mode == "fsdp")
    assert [r[index]["rc"] for r in results] == [0, 0], results[0][index]["stderr"][-2000:]
    one, two = root / f"one-{edge}", root / f"{mode}-{edge}"
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, {"epochs1": 2, "epochs2": 3}[edge] + 1))
    compare_runs(one, two, start=tiny_chat / "pissa_init")


def test_a_killed_rank_fails_its_peer_in_one_line_and_one_process_resumes(job, tiny_chat):
    """Rank 1 kills itself (SIGKILL) as step 3 starts, after the step-2 checkpoint; rank 0, alone in
    the collective, fails with one line. One process then resumes the 2-rank checkpoint and ends
    where the uninterrupted one-process run did."""
    root, data, one, _ = job
    out = root / "killed"
    ranks = start_by_hand("torch", root / "kill-job", [
        {"argv": train_argv(tiny_chat, out, data, "--dist-timeout", "60"), "capture": False,
         "hook": {"rank": 1, "signal": "SIGKILL", "step": 3}}])
    died = wait_until(lambda: ranks[1].poll() is not None, 120, "rank 1 to die")
    err = ranks[0].communicate(timeout=60)[1]
    assert ranks[1].returncode == -signal.SIGKILL and ranks[0].returncode == 2
    assert time.monotonic() - died < 30  # gloo notices a closed socket at once, long before the timeout
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("pissa: error: rank 0: step 3 failed: lost contact"), err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert main(train_argv(tiny_chat, out, data, "--resume")) == 0
    compare_runs(one, out)
