"""The demo arithmetic dataset: deterministic, no train/eval overlap, every answer right; and its scorer."""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pissa.studies.scoring import exact_match, final_number

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_demo_data.py"
DATA = ROOT / "data" / "arith"


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: load(DATA / f"{split}.jsonl") for split in ("train", "eval")}


def generate(out: Path, *args: str) -> dict[str, bytes]:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], check=True, capture_output=True)
    return {name: (out / name).read_bytes() for name in ("train.jsonl", "eval.jsonl")}


def test_generator_is_deterministic_and_matches_the_committed_files(tmp_path):
    a, b = generate(tmp_path / "a"), generate(tmp_path / "b")
    assert a == b
    assert a == {name: (DATA / name).read_bytes() for name in a}
    assert sum(len(v) for v in a.values()) < 1_000_000
    assert all(b"\r" not in v and v.endswith(b"\n") for v in a.values())


def test_arguments_are_honoured_and_eval_does_not_depend_on_train_size(tmp_path):
    small = generate(tmp_path / "s", "--train", "7", "--eval", "5", "--seed", "3")
    other = generate(tmp_path / "o", "--train", "50", "--eval", "5", "--seed", "3")
    assert small["train.jsonl"].count(b"\n") == 7 and small["eval.jsonl"].count(b"\n") == 5
    assert small["eval.jsonl"] == other["eval.jsonl"]
    assert other["train.jsonl"].startswith(small["train.jsonl"])
    assert generate(tmp_path / "x", "--train", "7", "--eval", "5", "--seed", "4") != small


def test_rows_are_chat_formatted_with_a_fixed_key_order(rows):
    assert (len(rows["train"]), len(rows["eval"])) == (2000, 100)
    for row in rows["train"] + rows["eval"]:
        assert list(row) == ["messages"]
        assert [list(m) for m in row["messages"]] == [["role", "content"]] * 2
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_no_question_is_repeated_within_or_across_splits(rows):
    train = [r["messages"][0]["content"] for r in rows["train"]]
    evals = [r["messages"][0]["content"] for r in rows["eval"]]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


# --- Checking every answer, independently of the generator ----------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr: str) -> int:
    """Integer + - * / arithmetic only; anything else (names, calls, powers) raises."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](ev(node.left), ev(node.right))
            assert value == int(value), f"inexact division in {expr!r}"
            return int(value)
        raise ValueError(f"not plain arithmetic: {ast.dump(node)}")
    return ev(ast.parse(expr, mode="eval"))


def check_steps(answer: str) -> int:
    """Every "A op B = C." step is right and chains on; returns the stated final answer."""
    *steps, last = re.split(r"(?<=\.) ", answer)
    m = re.fullmatch(r"The answer is (\d+)\.", last)
    assert m, answer
    assert 2 <= len(steps) <= 3, answer
    results = []
    for step in steps:
        m2 = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", step)
        assert m2, step
        left, op, right, result = m2.groups()
        assert safe_eval(f"{left} {op} {right}") == int(result), step
        assert 0 <= int(result) <= 200, step
        results.append(int(result))
    assert int(m.group(1)) == results[-1], answer
    return int(m.group(1))


LOSS = re.compile(r"\b(gives|loses|eats|sells|donates|uses|trades|spends|pop)\b")


def solve(question: str) -> int:
    """The answer recomputed from the question's words: each sentence's numbers multiply into an
    amount; the first sets the count, a loss verb subtracts, "equally" divides, else it adds."""
    *sentences, ask = re.split(r"(?<=[.?]) ", question)
    assert ask.startswith("How many ") and ask.endswith("?") and not re.search(r"\d", ask), question
    total = None
    for s in sentences:
        numbers = [int(x) for x in re.findall(r"\d+", s)]
        assert len(numbers) in (1, 2), s
        amount = numbers[0] * (numbers[1] if len(numbers) == 2 else 1)
        if total is None:
            total = amount
        elif "equally" in s:
            assert total % amount == 0, question
            total //= amount
        elif LOSS.search(s):
            total -= amount
        else:
            total += amount
        assert total >= 0, question
    return total


@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_answer_is_the_arithmetic_of_its_question(rows, split):
    for row in rows[split]:
        question, answer = (m["content"] for m in row["messages"])
        value = check_steps(answer)
        assert value == solve(question), (question, answer)
        assert final_number(answer) == str(value)


def test_the_generator_function_agrees_with_the_checks():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import random
    rng = random.Random(123)
    for _ in range(200):
        question, answer, value = mod.make_example(rng)
        assert check_steps(answer) == solve(question) == value


def test_the_checks_catch_wrong_answers():
    with pytest.raises(AssertionError):
        check_steps("4 * 6 = 25. 23 + 25 = 48. The answer is 48.")
    with pytest.raises(AssertionError):
        check_steps("4 * 6 = 24. 23 + 24 = 47. The answer is 46.")
    with pytest.raises(ValueError):
        safe_eval("__import__('os')")
    assert solve("Mia has 23 marbles. She buys 4 bags of 6 marbles. She gives 9 marbles to Leo. "
                 "How many marbles does Mia have now?") == 38
    assert solve("Ben has 40 eggs. He sells 10 eggs. He puts them equally into 5 cartons. "
                 "How many eggs are in each of the cartons?") == 6


# --- pissa.studies.scoring ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("4 * 6 = 24. 23 + 24 = 47. 47 - 9 = 38. The answer is 38.", "38"),
    ("The answer is 38. Check: 38 + 1 = 39", "38"),          # the stated answer beats later numbers
    ("First the answer is 3, no wait, the answer is: 5", "5"),  # the last statement wins
    ("So she has 12 left", "12"),                              # no statement: the last number
    ("The answer is $1,234.50.", "1234.5"),
    ('#### 4\nThe answer is "17".', "17"),
    ("**The answer is: **12** apples** (3 boxes)", "12"),
    ("It is -7.", "-7"),
    ("10-5", "5"),
    ("x = 038.0", "38"),
    ("There are 3.5 or 2.", "2"),
    ("no numbers here", None),
    ("", None),
    (None, None),
])
def test_final_number(text, want):
    assert final_number(text) == want


def test_exact_match():
    assert exact_match("47 - 9 = 38. The answer is 38.", "The answer is 38.")
    assert exact_match("I think it is 38.0", "23 + 4*6 - 9 = 38. The answer is 38.")
    assert not exact_match("The answer is 37.", "The answer is 38.")
    assert not exact_match("I don't know.", "The answer is 38.")
    assert not exact_match("", "")                      # no number never matches
    assert not exact_match("no idea", "no answer either")


def test_evaluate_imports_no_framework():
    code = "import sys, pissa.studies.scoring; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'mlx_lm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
