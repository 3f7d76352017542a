"""Built-in rewards and tasks: right answers score 1, wrong ones 0; splits are fixed and disjoint."""

import asyncio
import random

import pytest

from rewards import (
    BUILTIN_REWARDS,
    IllegalExpression,
    evaluate,
    get_task,
    last_number,
    load_reward,
    task_names,
)
from rewards.countdown_rule import extract_expression


def score_one(name, completion, **columns):
    result = load_reward(name).score(["prompt"], [[completion]], {k: [v] for k, v in columns.items()})
    return result.matrix[0, 0].item()


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("7", 1.0),
        ("The answer is 7.", 1.0),
        ("3 + 4 = 7", 1.0),
        ("Answer: 7. Check: 3 and 4", 1.0),
        ("\\boxed{7}", 1.0),
        ("7.0", 1.0),
        ("8", 0.0),
        ("3 + 4", 0.0),  # echoing the question is not an answer
        ("seven", 0.0),
        ("", 0.0),
    ],
)
def test_numeric(completion, expected):
    assert score_one("numeric", completion, answer="7") == expected


def test_numbers_are_read_exactly():
    assert last_number("x = -3") == -3 and last_number("8-4") == 4
    assert last_number("1,234 apples") == 1234 and last_number("about 0.25") == 0.25
    assert score_one("numeric", "so 1/2", answer="0.5") == 1.0


def test_math_uses_symbolic_equivalence_and_falls_back_to_numbers():
    assert score_one("math", "$\\frac{2}{4}$", answer="\\frac{1}{2}") == 1.0
    assert score_one("math", "The answer is 12", answer="12") == 1.0
    assert score_one("math", "The answer is 13", answer="12") == 0.0


def test_exact():
    assert score_one("exact", "  Paris. ", answer="paris") == 1.0
    assert score_one("exact", "<answer>Paris</answer> is the capital", answer="Paris") == 1.0
    assert score_one("exact", "London", answer="Paris") == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3 * 7 + 25", 1.0),
        ("(25 + 3 * 7) = 46", 1.0),
        ("46 = 25 + 7 * 3", 1.0),
        ("<answer>25 + 3 × 7</answer>", 1.0),
        ("25 + 7 * 3 = 46, so the answer is 46", 1.0),
        ("25 + 21", 0.0),  # 21 is not a given number
        ("3 * 7 + 25 + 3 - 3", 0.0),  # 3 used twice
        ("25 + 7 + 3", 0.0),  # legal but misses the target
        ("46", 0.0),
        ("2 ** 5 + 14", 0.0),
        ('__import__("os").system("true")', 0.0),
        ("", 0.0),
    ],
)
def test_countdown(completion, expected):
    assert score_one("countdown", completion, numbers=[3, 7, 25], target=46) == expected


def test_countdown_evaluation_is_exact_and_never_evals():
    assert evaluate("(7 - 3) / 8 * 25", [3, 7, 8, 25]) * 2 == 25
    assert evaluate("6 / 4 * 2", [6, 4, 2]) == 3
    for illegal in ("3 ** 7", "-3 + 7", "3.5 + 7", "abs(3)", "(lambda: 3)()", "7 / (3 - 3)", "3 // 7"):
        with pytest.raises(IllegalExpression):
            evaluate(illegal, [3, 7, 3])
    assert evaluate("3 + 3", [3, 3]) == 6  # a number given twice may be used twice
    assert extract_expression("Steps:\n(25 - 7) * 3 = 54\nDone") == "(25 - 7) * 3"


def test_format_and_length_rewards():
    assert score_one("format_number", " 42 ") == 1.0
    assert score_one("format_number", "The answer is 42") == 0.0
    assert score_one("format_answer_tag", "think... <answer>42</answer>") == 1.0
    assert score_one("format_answer_tag", "<answer></answer>") == 0.0
    assert score_one("length_penalty", "short") == 0.0
    assert score_one("length_penalty", "x" * (64 + 128)) == -0.5
    assert score_one("length_penalty", "x" * 10_000) == -1.0


def test_every_builtin_loads():
    for name in BUILTIN_REWARDS:
        assert load_reward(name).name == name


@pytest.mark.parametrize("name", ["arithmetic", "gsm", "countdown"])
def test_task_default_reward_scores_gold_1_and_wrong_0(name):
    task = get_task(name, seed=3)
    rows = task.sample(4, step=1) + task.eval_rows(4)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "messages")}
    if name == "countdown":
        right = [r["solution"] for r in rows]
        wrong = [" + ".join(str(n) for n in r["numbers"]) + " + 1" for r in rows]
    else:
        right = [f"The answer is {r['answer']}." for r in rows]
        wrong = [str(int(r["answer"]) + 1) for r in rows]
    result = task.reward().score([r["prompt"] for r in rows], [right, wrong], columns)
    assert result.matrix[0].tolist() == [1.0] * len(rows)
    assert result.matrix[1].tolist() == [0.0] * len(rows)


@pytest.mark.parametrize("name", ["arithmetic", "gsm", "countdown"])
def test_task_rows_and_splits(name):
    task = get_task(name, seed=7)
    row = task.sample(1, step=1)[0]
    assert isinstance(row["prompt"], str) and row["messages"] == [{"role": "user", "content": row["prompt"]}]
    assert len(row["prompt"]) < 200
    # Deterministic from (seed, step); different steps and seeds give different prompts.
    assert task.sample(8, step=5) == get_task(name, seed=7).sample(8, step=5)
    assert task.sample(8, step=5) != task.sample(8, step=6)
    assert task.eval_rows(16) == get_task(name, seed=7).eval_rows(16)
    assert task.eval_rows(16) != get_task(name, seed=8).eval_rows(16)
    held_out = {r["prompt"] for r in task.eval_rows()}
    assert len(held_out) == task.eval_size
    trained = {r["prompt"] for step in range(1, 60) for r in task.sample(8, step)}
    assert not trained & held_out
    assert len({r["prompt"] for r in task.sample(8, random.Random(0))}) == 8


def test_arithmetic_prompts_are_small_and_options_work():
    assert get_task("arithmetic", max_operand=9).eval_size == (100 + 55) // 4
    task = get_task("arithmetic", max_operand=9, eval_size=20)
    for row in task.sample(50, step=2):
        a, op, b = row["prompt"].removeprefix("What is ").split("?")[0].split()
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9 and int(row["answer"]) >= 0
        assert row["prompt"].endswith("Answer with just the number.")
    with pytest.raises(ValueError, match="holds out 20 eval prompts, 21 were asked for"):
        task.eval_rows(21)


def test_unknown_task_lists_the_names():
    with pytest.raises(ValueError) as info:
        get_task("chess")
    for name in task_names():
        assert name in str(info.value)
    with pytest.raises(ValueError, match="task 'arithmetic'"):
        get_task("arithmetic", colour="blue")


def test_math_works_off_the_main_thread():
    # Inside a running loop scoring moves to a worker thread, where math-verify's SIGALRM timeout
    # is unavailable; the reward must still work there.
    async def inside():
        return load_reward("math").score(["q"], [["$\\frac{2}{4}$"]], {"answer": ["\\frac{1}{2}"]})

    assert asyncio.run(inside()).matrix.item() == 1.0


def test_rows_without_gold_get_no_score():
    result = load_reward("numeric").score(["a", "b"], [["7", "7"]], {"answer": ["7", None]})
    assert result.valid.tolist() == [[True, False]]
    assert score_one("countdown", "3 + 4", numbers=None, target=7) != score_one(
        "countdown", "3 + 4", numbers=[3, 4], target=7
    )
