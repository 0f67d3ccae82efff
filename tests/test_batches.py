"""How examples become micro-batches (pissa.training.batches): packed rows never split an example
nor pass --max-seq-len, an epoch visits every example once, labels never cross examples, the
padded mode is pissa's old batching exactly, and --epochs sets the steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.training.batches import Plan, collate_rows, cut, pack
from pissa.numeric.loss import IGNORE
from pissa.training.data import Example, collate
from tests.conftest import DATA


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """pissa's batching before packing, kept here as the padded mode's reference: micro-batch number
    `index` of an endless shuffled stream, epoch e a permutation drawn from (seed, e), n // batch_size
    micro-batches an epoch, fewer examples than a batch repeated to fill it."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, k = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:
        return np.resize(order, batch_size)
    return order[k * batch_size:(k + 1) * batch_size]


def lengths(n: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths like instruction data: many short, a few as long as a row."""
    rng = np.random.default_rng(seed)
    return [int(min(128, 4 + rng.pareto(1.5) * 12)) for _ in range(n)]


def test_packing_keeps_examples_whole_within_a_row():
    L = lengths(500)
    for e in range(3):
        plan = Plan(L, batch_size=4, max_len=128, seed=7, mode="packed")
        rows = [row for batch in plan.epoch(e) for row in batch]
        seen = sorted(i for row in rows for i in row)
        assert seen == list(range(500))                     # every example once an epoch
        assert all(sum(L[i] for i in row) <= 128 for row in rows)
        assert max(L) == 128 and any(row == [L.index(128)] for row in rows)  # an example as long as a row
        fill = np.mean([sum(L[i] for i in row) for row in rows]) / 128
        assert fill > 0.9, fill                            # first fit among 8 open rows packs densely
    assert Plan(L, 4, 128, 7, "packed").epoch(0) != Plan(L, 4, 128, 7, "packed").epoch(1)  # reshuffled
    assert Plan(L, 4, 128, 7, "packed").epoch(0) != Plan(L, 4, 128, 8, "packed").epoch(0)  # seeded


def test_pack_is_first_fit_among_the_open_rows():
    assert pack([0, 1, 2, 3], [6, 6, 3, 4], 10) == [[0, 2], [1, 3]]
    assert pack([0, 1], [10, 1], 10) == [[0], [1]]


def test_padded_mode_is_the_old_batching():
    L = lengths(37)
    plan = Plan(L, batch_size=4, max_len=128, seed=3, mode="padded")
    for index in range(25):                                # across epoch boundaries
        assert [row[0] for row in plan.micro(index)] == list(batch_indices(37, 4, 3, index))
    small = Plan([5, 6], batch_size=4, max_len=128, seed=0, mode="padded")
    assert [row[0] for row in small.micro(0)] == list(batch_indices(2, 4, 0, 0))


def test_planning_in_epoch_10_costs_what_it_costs_in_epoch_0(monkeypatch):
    """200k records: the micro-batches of epoch 10 cost one packing of that epoch, as those of epoch
    0 cost one of epoch 0, however many are asked for; earlier epochs are packed once to count them,
    and only one epoch's plan is kept. (It used to re-walk every earlier epoch at each call.)"""
    L = lengths(200_000)
    made: list[int] = []
    real = Plan._make
    monkeypatch.setattr(Plan, "_make", lambda self, e: made.append(e) or real(self, e))
    fresh = Plan(L, batch_size=8, max_len=128, seed=0)
    early = [fresh.micro(k) for k in range(0, 2000, 40)]
    assert made == [0]                                   # epoch 0: one packing for 50 micro-batches
    made.clear()
    plan = Plan(L, batch_size=8, max_len=128, seed=0)
    start = plan.micro_batches(10)                       # counting epochs 0-9 packs each once
    assert made == list(range(10))
    made.clear()
    late = [plan.micro(start + k) for k in range(0, 2000, 40)]
    assert made == [10]                                  # epoch 10: one packing for 50 micro-batches
    assert late == [real(plan, 10)[k] for k in range(0, 2000, 40)] and early == plan.epoch(0)[0:2000:40]
    assert plan.locate(start - 1) == (9, plan.micro_batches(10) - plan.micro_batches(9) - 1)
    assert plan._kept[0] == 0 and len(plan._ends) == 11  # one epoch's plan kept; of the others their counts


def test_batch_tokens_cuts_micro_batches_by_real_tokens():
    """--batch-tokens N: rows in order while they hold at most N real tokens (one row always), capped
    at --batch-size rows when that is given too; every example once an epoch, packed or padded."""
    rows = [[0], [1], [2], [3], [4]]
    assert cut(rows, [100, 100, 60, 300, 10], None, 256) == [[[0], [1]], [[2]], [[3]], [[4]]]
    assert cut(rows, [10, 10, 10, 10, 10], 2, 256) == [[[0], [1]], [[2], [3]], [[4]]]
    assert cut(rows, [10, 10, 10, 10, 10], 2) == [[[0], [1]], [[2], [3]], [[4]]]
    L = lengths(500)
    for mode in ("packed", "padded", "grouped"):
        plan = Plan(L, None, 128, 7, mode, batch_tokens=512)
        for e in range(2):
            batches = plan.epoch(e)
            assert sorted(i for b in batches for row in b for i in row) == list(range(500)), mode
            sizes = [sum(L[i] for row in b for i in row) for b in batches]
            assert all(n <= 512 or len(b) == 1 for n, b in zip(sizes, batches)), mode
            assert np.mean(sizes) > 0.8 * 512 or mode == "grouped", (mode, np.mean(sizes))
    assert max(len(b) for b in Plan(L, 3, 128, 7, "packed", batch_tokens=512).epoch(0)) == 3


def test_grouped_batches_are_of_similar_lengths_and_cover_the_epoch():
    L = lengths(400)
    plan = Plan(L, batch_size=4, max_len=128, seed=1, mode="grouped")
    batches = plan.epoch(0)
    assert sorted(r[0] for b in batches for r in b) == list(range(400))
    spread = np.mean([max(L[r[0]] for r in b) - min(L[r[0]] for r in b) for b in batches])
    shuffled = Plan(L, 4, 128, 1, "padded").epoch(0)
    assert spread < 0.5 * np.mean([max(L[r[0]] for r in b) - min(L[r[0]] for r in b) for b in shuffled])


def test_a_packed_row_labels_each_example_as_alone():
    examples = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])]
    b = collate_rows(examples, [[0, 1], [2]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    # the first token of the second example gets no label: position 2 (token 3) must not predict 4
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5], [6, 7, 8, 9, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # the labelled next-token positions are those of the examples alone, one by one
    alone = sum(int((collate([e], 0)["labels"][:, 1:] != IGNORE).sum()) for e in examples)
    assert int((b["labels"][:, 1:] != IGNORE).sum()) == alone
    # rows of one example each are exactly collate's batches
    single = collate_rows(examples, [[0], [1], [2]], pad_id=0)
    for key, value in collate(examples, 0).items():
        assert np.array_equal(single[key], value)
    assert "segment_ids" not in single


@pytest.mark.parametrize("packing", [True, False, "tokens"])
def test_epochs_1_visits_every_example_once(packing, tiny_chat, tmp_path):
    """--epochs 1: the steps are the epoch's micro-batches (over --grad-accum), and the run trains
    on every record's tokens exactly once (metrics.jsonl counts the real tokens of each step); with
    --batch-tokens each micro-batch holds at most that many (or one row)."""
    from pissa.cli import main
    from pissa.training.data import load_dataset

    from pissa.files.tokenizer import load_tokenizer

    data = tmp_path / "data.jsonl"
    lines = (DATA / "train.jsonl").read_text().splitlines()[:30]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    size = ["--batch-tokens", "256"] if packing == "tokens" else ["--batch-size", "4"]
    args = ["train", str(tiny_chat), "--data", str(data), "--out", str(out), "--epochs", "1", *size,
            "--grad-accum", "2", "--max-seq-len", "128", "--backend", "torch", "--no-progress"]
    assert main(args + ([] if packing else ["--no-packing"])) == 0
    config = json.loads((out / "config.json").read_text())
    examples = load_dataset(data, load_tokenizer(tiny_chat), 128).examples
    plan = Plan([len(e.input_ids) for e in examples], config["train"]["batch_size"], 128, 0, config["batching"],
                config["train"]["batch_tokens"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == -(-plan.micro_batches(1) // 2) == config["train"]["steps"]
    if packing:
        assert sum(r["tokens"] for r in steps) == sum(len(e.input_ids) for e in examples)
        assert config["batching"] in ("packed", "grouped")
    else:  # padded batches leave the epoch's remainder (30 % 4) out, as they always did
        assert config["batching"] == "padded" and sum(r["tokens"] for r in steps) <= sum(
            len(e.input_ids) for e in examples)
    if packing == "tokens":
        assert config["train"]["batch_size"] is None and all(r["tokens"] <= 2 * 256 for r in steps)
        sizes = [sum(len(examples[i].input_ids) for row in b for i in row) for b in plan.epoch(0)]
        assert all(n <= 256 for n in sizes) and max(sizes) > 200, sizes  # cut by tokens, filled
