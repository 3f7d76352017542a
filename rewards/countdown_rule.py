"""The Countdown check: an arithmetic expression over the given numbers that hits the target.

Rule (the usual Countdown one): only + - * / and parentheses, each given number used at most once
(a number given twice may be used twice), exact rational arithmetic, and the value must equal the
target. The expression is parsed with `ast` and walked node by node; nothing is ever eval'ed.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

from .answers import final_answer
from .calling import per_sample

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_EXPR_CHARS = re.compile(r"[\d\s+\-*/×÷x().]+")
# Longer input cannot be a legal expression over a handful of small numbers; refusing it early
# keeps a rambling completion from costing a deep parse.
MAX_EXPRESSION_CHARS = 200


class IllegalExpression(ValueError):
    """The text is not a Countdown expression (bad syntax, a disallowed operation, a reused number)."""


def evaluate(expression: str, numbers) -> Fraction:
    """The exact value of `expression`; raises IllegalExpression unless it follows the Countdown rule."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise IllegalExpression(f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise IllegalExpression(f"not an expression: {exc.msg}") from None
    used = Counter()
    _collect(tree.body, used)
    allowed = Counter(int(n) for n in numbers)
    over = used - allowed
    if over:
        raise IllegalExpression(f"uses {sorted(over.elements())} beyond the given numbers {sorted(allowed.elements())}")
    return _value(tree.body)


def _collect(node: ast.AST, used: Counter) -> None:
    # Check every node before computing anything, so no disallowed construct is ever evaluated.
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        _collect(node.left, used)
        _collect(node.right, used)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        used[node.value] += 1
    else:
        raise IllegalExpression(f"{type(node).__name__} is not allowed (only integers, + - * / and parentheses)")


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _value(node.left), _value(node.right)
    op = type(node.op)
    if op is ast.Add:
        return left + right
    if op is ast.Sub:
        return left - right
    if op is ast.Mult:
        return left * right
    if right == 0:
        raise IllegalExpression("division by zero")
    return left / right


def extract_expression(completion: str) -> str | None:
    """The expression a completion proposes: in its marked answer, else its last line with an operator.

    "3 * 7 + 25 = 46" and "46 = 3 * 7 + 25" both give "3 * 7 + 25"; prose around the expression
    is dropped. A marked answer that is just a number ("the answer is 46") defers to an expression
    written elsewhere. A lone number is the candidate only when nothing has an operator.
    """
    marked = final_answer(completion)
    bare = None
    for text in (marked, completion) if marked is not completion else (completion,):
        for line in reversed([line for line in text.splitlines() if re.search(r"\d", line)]):
            sides = [s for s in (_clean(side) for side in line.split("=")) if re.search(r"\d", s)]
            with_ops = [s for s in sides if re.search(r"[\d)]\s*[+\-*/]\s*[\d(]", s)]
            if with_ops:
                return with_ops[0]
            if bare is None and sides:
                bare = sides[-1]
    return bare


def _clean(text: str) -> str:
    runs = [m.group(0) for m in _EXPR_CHARS.finditer(text.replace("\\times", "*").replace("\\div", "/"))]
    runs = [r for r in runs if re.search(r"\d", r)]
    if not runs:
        return ""
    best = max(runs, key=lambda r: (len(re.findall(r"\d+", r)), len(r)))
    best = best.replace("×", "*").replace("÷", "/")
    # "3 x 4" is multiplication; an x glued to letters was already cut away by the character class.
    best = re.sub(r"(?<=[\d)\s])x(?=[\s\d(])", "*", best)
    return best.strip().rstrip(".").strip()


def countdown_correct(completion: str, numbers, target) -> bool:
    expression = extract_expression(completion)
    if expression is None:
        return False
    try:
        return evaluate(expression, numbers) == Fraction(int(target))
    except IllegalExpression:
        return False


@per_sample(name="countdown")
def countdown(completion: str, numbers, target, **_) -> float | None:
    """1.0 if the completion's expression uses the given `numbers` at most once each and equals
    `target`, else 0.0; None (no score) for a row without numbers or target."""
    if numbers is None or target is None:
        return None
    return 1.0 if countdown_correct(completion, numbers, target) else 0.0
