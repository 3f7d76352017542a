"""Rewards on the shape of a completion rather than its correctness: regex formats and length."""

from __future__ import annotations

import re

from .calling import FunctionReward, per_sample


def regex_reward(
    pattern: str | re.Pattern,
    *,
    name: str = "regex",
    full_match: bool = False,
    hit: float = 1.0,
    miss: float = 0.0,
    flags: int = re.DOTALL,
) -> FunctionReward:
    """`hit` when `pattern` is found in the completion (or matches all of it, stripped, with
    full_match), else `miss`."""
    compiled = re.compile(pattern, flags) if isinstance(pattern, str) else pattern
    find = compiled.fullmatch if full_match else compiled.search

    @per_sample(name=name)
    def matches(completion: str, **_) -> float:
        return hit if find(completion.strip() if full_match else completion) else miss

    return FunctionReward(matches, name=name, text_only=True)


def format_number() -> FunctionReward:
    """1.0 when the completion is just a number ("7", "-3", "0.5", "7."), as the arithmetic prompts ask."""
    return regex_reward(r"-?\d+(?:,\d{3})*(?:\.\d+)?\.?", name="format_number", full_match=True)


def format_answer_tag() -> FunctionReward:
    """1.0 when the completion holds exactly one <answer>...</answer> block with something in it."""

    @per_sample(name="format_answer_tag")
    def one_answer_tag(completion: str, **_) -> float:
        blocks = re.findall(r"<answer>(.*?)</answer>", completion, re.S)
        return 1.0 if len(blocks) == 1 and blocks[0].strip() else 0.0

    return FunctionReward(one_answer_tag, text_only=True)


def length_penalty(max_chars: int = 64, span: int = 256) -> FunctionReward:
    """0 up to `max_chars` characters (stripped), then falling linearly to -1 at max_chars + span.

    Characters rather than tokens: the reward sees text only, and the ratio is close enough for a
    penalty whose job is to discourage rambling after the answer.
    """
    if max_chars < 0 or span <= 0:
        raise ValueError(f"length_penalty needs max_chars >= 0 and span > 0, got {max_chars}, {span}")

    @per_sample(name="length_penalty")
    def penalty(completion: str, **_) -> float:
        over = max(0, len(completion.strip()) - max_chars)
        return -min(1.0, over / span) if over else 0.0

    return FunctionReward(penalty, text_only=True)
