"""Write a deterministic demo dataset of multi-step arithmetic word problems (stdlib only).

    python scripts/make_demo_data.py --out data/arith --train 2000 --eval 100 --seed 0

Writes ``train.jsonl`` and ``eval.jsonl``: one JSON object per line, in chat format,
``{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}``.

QUESTION is a short story: a start sentence, one or two events, an optional "shares them
equally" sentence, and a question. It needs 2 or 3 arithmetic operations:

    Mia has 23 marbles. She buys 4 bags of 6 marbles. She gives 9 marbles to Leo.
    How many marbles does Mia have now?

ANSWER works it out one binary operation per sentence, then states the result:

    4 * 6 = 24. 23 + 24 = 47. 47 - 9 = 38. The answer is 38.

Each step is ``A op B = C.`` with op one of ``+ - * /`` (``/`` always divides exactly), each
step's first operand is a number from the question or the previous step's result, and the
answer always ends with ``The answer is N.`` (N a non-negative integer, at most 200, the
result of the last step; pissa.studies.scoring.final_number reads it). Writing out each step keeps
every operation a single small sum, difference, product or exact quotient, which a small
model can learn; asking it to compute "23 + 4*6 - 9" in one go is much harder.

Every intermediate value lies in 1..200. Eval is drawn first, so it stays the same whatever
--train is; no question appears twice in either file or in both. Same arguments give
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [("Mia", "She"), ("Liam", "He"), ("Noah", "He"), ("Emma", "She"), ("Ava", "She"),
         ("Leo", "He"), ("Zoe", "She"), ("Omar", "He"), ("Priya", "She"), ("Kenji", "He"),
         ("Sofia", "She"), ("Lucas", "He"), ("Amara", "She"), ("Ben", "He"), ("Chloe", "She"),
         ("Diego", "He"), ("Hana", "She"), ("Ivan", "He"), ("Nora", "She"), ("Sam", "He")]

# Each scenario: the things counted, their container, and sentences for each kind of event.
# Placeholders: {P} pronoun, {F} a friend's name, {obj} things, {box} containers, and the
# numbers {b} (one amount) or {n} {k} (n groups of k). Gains never use a loss verb
# (gives, loses, eats, sells, donates, uses, trades, spends, pop): tests read the sign from it.
SCENARIOS = [
    {"obj": "marbles", "box": "bags",
     "gain": ["{P} buys {b} more {obj}.", "{P} wins {b} {obj} in a game."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} gives {b} {obj} to {F}.", "{P} loses {b} {obj}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "stickers", "box": "sheets",
     "gain": ["{P} buys {b} more {obj}.", "{P} gets {b} {obj} from {F}."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} uses {b} {obj} on a poster.", "{P} gives {b} {obj} to {F}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "apples", "box": "baskets",
     "gain": ["{P} picks {b} more {obj}.", "{P} buys {b} more {obj}."],
     "gain_group": ["{P} picks {n} {box} of {k} {obj}."],
     "loss": ["{P} eats {b} {obj}.", "{P} sells {b} {obj}.", "{P} gives {b} {obj} to {F}."],
     "loss_group": ["{P} sells {n} {box} of {k} {obj}."]},
    {"obj": "cookies", "box": "trays",
     "gain": ["{P} bakes {b} more {obj}.", "{P} buys {b} more {obj}."],
     "gain_group": ["{P} bakes {n} {box} of {k} {obj}."],
     "loss": ["{P} eats {b} {obj}.", "{P} sells {b} {obj}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "books", "box": "boxes",
     "gain": ["{P} buys {b} more {obj}.", "{P} gets {b} {obj} from {F}."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} donates {b} {obj} to the library.", "{P} sells {b} {obj}."],
     "loss_group": ["{P} donates {n} {box} of {k} {obj}."]},
    {"obj": "pencils", "box": "packs",
     "gain": ["{P} buys {b} more {obj}.", "{P} finds {b} {obj} in a drawer."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} loses {b} {obj}.", "{P} gives {b} {obj} to {F}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "seashells", "box": "buckets",
     "gain": ["{P} finds {b} more {obj}.", "{P} collects {b} more {obj}."],
     "gain_group": ["{P} collects {n} {box} of {k} {obj}."],
     "loss": ["{P} gives {b} {obj} to {F}.", "{P} loses {b} {obj}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "cards", "box": "packs",
     "gain": ["{P} wins {b} {obj} from {F}.", "{P} buys {b} more {obj}."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} trades {b} {obj} to {F}.", "{P} loses {b} {obj}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "balloons", "box": "packs",
     "gain": ["{P} buys {b} more {obj}.", "{P} gets {b} {obj} from {F}."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{b} of the {obj} pop.", "{P} gives {b} {obj} to {F}."],
     "loss_group": ["{P} gives {n} friends {k} {obj} each."]},
    {"obj": "eggs", "box": "cartons",
     "gain": ["{P} collects {b} more {obj}.", "{P} buys {b} more {obj}."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} uses {b} {obj} to bake a cake.", "{P} sells {b} {obj}."],
     "loss_group": ["{P} sells {n} {box} of {k} {obj}."]},
    {"obj": "coins", "box": "jars",
     "gain": ["{P} finds {b} more {obj}.", "{P} earns {b} {obj}."],
     "gain_group": ["{P} finds {n} {box} of {k} {obj}."],
     "loss": ["{P} spends {b} {obj}.", "{P} gives {b} {obj} to {F}."],
     "loss_group": ["{P} spends {k} {obj} on each of {n} toys."]},
    {"obj": "flowers", "box": "bunches",
     "gain": ["{P} picks {b} more {obj}.", "{P} buys {b} more {obj}."],
     "gain_group": ["{P} buys {n} {box} of {k} {obj}."],
     "loss": ["{P} gives {b} {obj} to {F}.", "{P} sells {b} {obj}."],
     "loss_group": ["{P} sells {n} {box} of {k} {obj}."]},
]

MAX_VALUE = 200


def make_example(rng: random.Random) -> tuple[str, str, int]:
    """One random problem: (question, answer, value), value being the answer's final number."""
    while True:
        got = _try_example(rng)
        if got is not None:
            return got


def _try_example(rng: random.Random) -> tuple[str, str, int] | None:
    """One draw; None when it breaks a rule (op count, range, no exact division)."""
    sc = rng.choice(SCENARIOS)
    (name, pron), friend = rng.sample(NAMES, 2)
    fill = {"P": pron, "F": friend[0], "obj": sc["obj"], "box": sc["box"]}
    sentences, steps = [], []

    if rng.random() < 0.25:
        n, k = rng.randint(2, 6), rng.randint(2, 12)
        cur = n * k
        sentences.append(f"{name} has {n} {sc['box']} of {k} {sc['obj']}.")
        steps.append(f"{n} * {k} = {cur}.")
    else:
        cur = rng.randint(5, 60)
        sentences.append(f"{name} has {cur} {sc['obj']}.")

    for _ in range(rng.choice((1, 2))):
        kind = rng.choice(("gain", "gain", "loss", "loss", "gain_group", "loss_group"))
        text = rng.choice(sc[kind])
        if kind.endswith("group"):
            n, k = rng.randint(2, 5), rng.randint(2, 10)
            amount = n * k
            steps.append(f"{n} * {k} = {amount}.")
            text = text.format(n=n, k=k, **fill)
        else:
            amount = rng.randint(2, 25)
            text = text.format(b=amount, **fill)
        new = cur + amount if kind.startswith("gain") else cur - amount
        if not 1 <= new <= MAX_VALUE:
            return None
        steps.append(f"{cur} {'+' if kind.startswith('gain') else '-'} {amount} = {new}.")
        sentences.append(text[0].upper() + text[1:])
        cur = new

    if rng.random() < 0.2:
        divisors = [k for k in range(2, 7) if cur % k == 0 and cur // k >= 2]
        if not divisors:
            return None
        k = rng.choice(divisors)
        steps.append(f"{cur} / {k} = {cur // k}.")
        cur //= k
        if rng.random() < 0.5:
            sentences.append(f"{pron} shares them equally among {k} friends.")
            sentences.append(f"How many {sc['obj']} does each friend get?")
        else:
            sentences.append(f"{pron} puts them equally into {k} {sc['box']}.")
            sentences.append(f"How many {sc['obj']} are in each of the {sc['box']}?")
    else:
        sentences.append(f"How many {sc['obj']} does {name} have now?")

    if len(steps) not in (2, 3):
        return None
    steps.append(f"The answer is {cur}.")
    return " ".join(sentences), " ".join(steps), cur


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows in chat format; eval drawn first; all questions distinct."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_eval + n_train:
        question, answer, _ = make_example(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows[n_eval:], rows[:n_eval]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, '\\n' line endings."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/arith", help="output folder (default: data/arith)")
    ap.add_argument("--train", type=int, default=2000, help="training examples (default: 2000)")
    ap.add_argument("--eval", type=int, default=100, help="evaluation examples (default: 100)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        ap.error("--train and --eval must be >= 0")
    train, evals = make_splits(args.train, args.eval, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval examples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
