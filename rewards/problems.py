"""Procedural problem generators: each draws one problem from a random.Random.

A problem is a dict with `prompt` (the user message), its gold columns, and `key`, a string that
identifies the problem so that held-out and training draws can be kept apart. Generated here
rather than taken from reasoning-gym: its pinned dependencies include a C extension built from
source (pycosat) and a dozen packages these three small generators do not need.
"""

from __future__ import annotations

import random
from fractions import Fraction

ANSWER_NUMBER = "Answer with just the number."
ANSWER_EXPRESSION = "Answer with just the expression."

NAMES = ("Tom", "Anna", "Sam", "Mia", "Ben", "Lily", "Max", "Emma", "Leo", "Zoe", "Noah", "Ava")
ITEMS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "balloons", "shells", "toys")


def arithmetic(rng: random.Random, max_operand: int = 20, ops: str = "+-") -> dict:
    """'What is 3 + 4? Answer with just the number.'; subtraction never goes below zero."""
    op = rng.choice(ops)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"What is {a} {op} {b}? {ANSWER_NUMBER}", "answer": str(value), "key": f"{a}{op}{b}"}


def _word_add(rng, n, m, item):
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?", a + b


def _word_sub(rng, n, m, item):
    a = rng.randint(2, 15)
    b = rng.randint(1, a - 1)
    return f"{n} has {a} {item} and gives away {b}. How many {item} does {n} have left?", a - b


def _word_mul(rng, n, m, item):
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    return f"{n} has {a} boxes with {b} {item} in each box. How many {item} does {n} have?", a * b


def _word_div(rng, n, m, item):
    b, k = rng.randint(2, 5), rng.randint(1, 6)
    return f"{n} shares {b * k} {item} equally among {b} friends. How many {item} does each friend get?", k


def _word_two_step(rng, n, m, item):
    a, b = rng.randint(2, 10), rng.randint(1, 10)
    c = rng.randint(1, a + b - 1)
    return f"{n} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {n} have now?", a + b - c


def _word_more_than(rng, n, m, item):
    a, b = rng.randint(1, 12), rng.randint(1, 9)
    return f"{n} has {a} {item}. {m} has {b} more {item} than {n}. How many {item} does {m} have?", a + b


def _word_together(rng, n, m, item):
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return f"{n} has {a} {item} and {m} has {b} {item}. How many {item} do they have together?", a + b


def _word_difference(rng, n, m, item):
    a = rng.randint(3, 15)
    b = rng.randint(1, a - 1)
    return f"{n} has {a} {item} and {m} has {b}. How many more {item} does {n} have than {m}?", a - b


WORD_TEMPLATES = (
    _word_add,
    _word_sub,
    _word_mul,
    _word_div,
    _word_two_step,
    _word_more_than,
    _word_together,
    _word_difference,
)


def word_problem(rng: random.Random) -> dict:
    """A one- or two-step GSM8K-style word problem with small whole numbers."""
    template = rng.choice(WORD_TEMPLATES)
    n, m = rng.sample(NAMES, 2)
    text, value = template(rng, n, m, rng.choice(ITEMS))
    return {"prompt": f"{text} {ANSWER_NUMBER}", "answer": str(value), "key": text}


def countdown(rng: random.Random, count: int = 3, max_number: int = 20, max_target: int = 100) -> dict:
    """'Using the numbers 3, 7, 12, make 33. ...'; the target is reachable by construction."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        used = rng.sample(numbers, rng.randint(2, count))
        value, expression = Fraction(used[0]), str(used[0])
        for x in used[1:]:
            op = rng.choice("+-*/")
            if op == "-" and value - x <= 0 or op == "/" and (value / x).denominator != 1:
                op = "+"
            value = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op]
            expression = f"({expression} {op} {x})"
        if 1 <= value <= max_target and value not in numbers:
            break
    target = int(value)
    shown = ", ".join(str(x) for x in numbers)
    prompt = (
        f"Using the numbers {shown}, make {target}. Use + - * / and parentheses, "
        f"each number at most once. {ANSWER_EXPRESSION}"
    )
    return {
        "prompt": prompt,
        "numbers": numbers,
        "target": target,
        "solution": expression[1:-1] if expression.startswith("(") else expression,
        "key": f"{sorted(numbers)}->{target}",
    }
