"""pissa init and train across 2 CPU processes with mlx.core.distributed on the ring backend: under
mlx.launch, init byte for byte as one process and data-parallel training with one process's losses
and adapter; started by hand, a rank that hangs makes its peer fail with one line once
--dist-timeout passes (MLX collectives have no timeout of their own: pissa's watchdog), and the
last checkpoint resumes in one process to the same end."""

from __future__ import annotations

import signal
import time

import pytest

pytest.importorskip("mlx.core")

from pissa.cli import main  # noqa: E402
from tests.dist_jobs import (EDGE_TRAIN, EDGES, TRAIN, compare_runs, five_records, launch, leftovers,  # noqa: E402
                             same_folders, small_data, start_by_hand, stopped, wait_until)

pytestmark = pytest.mark.slow
TIMEOUT = 5  # seconds: --dist-timeout of the hang test


def train_argv(model, out, data, *extra):
    return ["train", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--out", str(out),
            "--backend", "mlx", *TRAIN, *extra]


def edge_argv(model, out, five, edge):
    return ["train", str(model), "--data", str(five), "--out", str(out), "--backend", "mlx", *EDGE_TRAIN, *EDGES[edge]]


@pytest.fixture(scope="module")
def job(tiny_chat_base, tiny_chat, tmp_path_factory):
    """One mlx.launch job of 2 ranks: an MLX-backend init and a data-parallel run, after the same
    init and run in this one process (the init into the same --out, then moved aside)."""
    root = tmp_path_factory.mktemp("dist_mlx")
    data = small_data(root / "data")
    init = ["init", str(tiny_chat_base), "--out", str(root / "init"), "--rank", "4", "--init", "pissa-fast",
            "--backend", "mlx", "--no-progress"]
    assert main(init) == 0
    (root / "init").rename(root / "init-one")
    one = root / "one"
    assert main(train_argv(tiny_chat, one, data)) == 0
    five = five_records(root / "data")
    for edge in EDGES:
        assert main(edge_argv(tiny_chat, root / f"one-{edge}", five, edge)) == 0
    start = time.perf_counter()
    results = launch("mlx.launch", root / "job", [{"argv": init}, {"argv": train_argv(tiny_chat, root / "two", data)},
                                                  *({"argv": edge_argv(tiny_chat, root / f"two-{edge}", five, edge)}
                                                    for edge in EDGES)])
    print(f"mlx.launch job: {time.perf_counter() - start:.1f} s")
    return root, data, one, results


def test_init_across_ranks_is_byte_identical(job):
    root, _, _, results = job
    assert [r[0]["rc"] for r in results] == [0, 0]
    same_folders(root / "init-one", root / "init")
    assert leftovers(root) == []


def test_two_ranks_train_as_one_process(job):
    root, _, one, results = job
    assert [r[1]["rc"] for r in results] == [0, 0], results[0][1]["stderr"][-2000:]
    compare_runs(one, root / "two")
    assert leftovers(root / "two") == [] and (root / "two" / "loss.png").exists()


@pytest.mark.parametrize("edge", list(EDGES))
def test_an_epoch_ending_on_fewer_rows_than_ranks_trains_as_one_process(job, tiny_chat, edge):
    """As tests/test_dist_torch.py's: a rank without a row of the epoch's last micro-batch (MLX once
    failed there taking from an empty axis), a short last step, a step across the epoch's end."""
    root, _, _, results = job
    index = 2 + list(EDGES).index(edge)
    assert [r[index]["rc"] for r in results] == [0, 0], results[0][index]["stderr"][-2000:]
    compare_runs(root / f"one-{edge}", root / f"two-{edge}", start=tiny_chat / "pissa_init")


def test_a_hung_rank_fails_its_peer_after_the_timeout_and_one_process_resumes(job, tiny_chat):
    """Rank 1 stops itself (SIGSTOP) as step 3 starts: its sockets stay open, so only the timeout
    can tell. Rank 0 must fail with one line after --dist-timeout; the test then kills rank 1 and
    resumes its last checkpoint (step 2) in one process."""
    root, data, one, _ = job
    out = root / "hung"
    ranks = start_by_hand("mlx", root / "hang-job", [
        {"argv": train_argv(tiny_chat, out, data, "--dist-timeout", str(TIMEOUT)), "capture": False,
         "hook": {"rank": 1, "signal": "SIGSTOP", "step": 3}}])
    try:
        hung = wait_until(lambda: ranks[1].poll() is not None or stopped(ranks[1]), 120, "rank 1 to stop")
        err = ranks[0].communicate(timeout=TIMEOUT + 60)[1]
        waited = time.monotonic() - hung
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 2 and ranks[1].returncode == -signal.SIGKILL
    assert waited < TIMEOUT + 15, waited
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("pissa: error: rank 0: step 3 failed: lost contact with the other ranks (no answer "
                                f"within {TIMEOUT} s)"), err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert main(train_argv(tiny_chat, out, data, "--resume")) == 0
    compare_runs(one, out)
