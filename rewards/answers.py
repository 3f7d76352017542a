"""Answer checking against a gold `answer` column: plain numbers, exact strings, math-verify.

The `numeric` check compares literal numbers only. It never evaluates an expression, so a model
that echoes the question ("3 + 4") gets no credit, which math-verify would give it (it evaluates
"3 + 4" to 7). That is why `numeric` is the default for the arithmetic tasks and `math` is for
answers that need symbolic equivalence (fractions, radicals, LaTeX).
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from .calling import per_sample

# A leading minus counts as a sign only where it cannot be a subtraction: "8-4" is 8 and 4.
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# Where a completion marks its final answer; the last mark wins. Unmarked text falls back to
# its last number, the usual GSM8K convention.
_MARKS = (
    re.compile(r"<answer>(.*?)</answer>", re.S | re.I),
    re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}"),
    re.compile(r"####\s*([^\n]*)"),
    # Up to the end of that sentence: "Answer: 12. Check: 3 and 4" answers 12.
    re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]*?)(?:\.(?:\s|$)|\n|$)", re.I),
)
# math-verify's parser is given only the end of a completion: the answer is there, and a runaway
# generation must not turn into a long symbolic parse.
MATH_VERIFY_TAIL = 2000


def final_answer(text: str) -> str:
    """The span a completion marks as its answer (answer tag, \\boxed, ####, 'answer is'), else all of it."""
    best, best_at = None, -1
    for pattern in _MARKS:
        for m in pattern.finditer(text):
            if m.start() > best_at:
                best, best_at = m.group(1), m.start()
    return text if best is None else best


def parse_number(text: str) -> Fraction | None:
    """An exact number from '7', '-3', '1,234', '0.25' or '3/4'; None if `text` is not one."""
    text = str(text).strip().replace(",", "").rstrip(".")
    text = text.removeprefix("$").removesuffix("$").strip()
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number written in `text` (after picking its marked answer, if any)."""
    for token in reversed(_NUMBER.findall(final_answer(text))):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def normalize(text: str) -> str:
    text = str(text).strip().strip("$").strip()
    text = re.sub(r"\s+", " ", text).casefold()
    return text.rstrip(".").strip().strip("\"'")


@per_sample(name="numeric")
def numeric(completion: str, answer, **_) -> float | None:
    """1.0 if the completion's final number equals the gold number exactly (7 == 7.0 == 14/2), else 0.0.

    A gold answer that is not a plain number is compared as a normalized string instead; a row
    without a gold answer gets no score (None).
    """
    if answer is None:
        return None
    gold = parse_number(answer)
    if gold is None:
        return exact(completion, answer)
    return 1.0 if last_number(completion) == gold else 0.0


@per_sample(name="exact")
def exact(completion: str, answer, **_) -> float | None:
    """1.0 if the marked answer (or the whole completion) equals the gold string, ignoring case,
    surrounding whitespace, $...$ and a final period; else 0.0 (None without a gold answer)."""
    if answer is None:
        return None
    return 1.0 if normalize(final_answer(completion)) == normalize(answer) else 0.0


@per_sample(name="math")
def math_answer(completion: str, answer, **_) -> float | None:
    """1.0 if math-verify finds the completion's answer equivalent to the gold one, else 0.0.

    Falls back to `numeric` when math-verify is not installed or extracts nothing from either side.
    """
    if answer is None:
        return None
    try:
        from math_verify import parse, verify
    except ImportError:
        return numeric(completion, answer)
    # math-verify enforces its timeouts with SIGALRM, which only the main thread may use.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    gold = parse(_as_math(str(answer)), parsing_timeout=timeout)
    guess = parse(completion[-MATH_VERIFY_TAIL:], parsing_timeout=timeout)
    if not gold or not guess:
        return numeric(completion, answer)
    return 1.0 if verify(gold, guess, timeout_seconds=timeout) else 0.0


def _as_math(answer: str) -> str:
    # A bare LaTeX gold ("\frac{1}{2}") is only recognised inside math delimiters.
    return answer if "$" in answer or "\\(" in answer or "\\boxed" in answer else f"${answer}$"
