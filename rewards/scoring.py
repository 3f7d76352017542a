"""The trainer's entry point: score a population's completions with any reward-like object."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

from .base import CombinedReward, Reward
from .calling import FunctionReward
from .errors import RewardLoadError
from .result import RewardResult


def as_reward(obj, name: str | None = None) -> Reward:
    """A Reward from a Reward (returned as is), a Reward subclass (instantiated) or a function."""
    if isinstance(obj, Reward):
        return obj
    if inspect.isclass(obj) and issubclass(obj, Reward):
        try:
            return obj()
        except TypeError as exc:
            raise RewardLoadError(
                f"reward class {obj.__name__} must be constructible without arguments: {exc}"
            ) from None
    if callable(obj):
        return FunctionReward(obj, name=name)
    raise RewardLoadError(f"{name or 'the object'} is a {type(obj).__name__}, not a reward function or Reward")


def combine(*rewards: Reward | Callable, weights: Sequence[float] | None = None, name: str = "total") -> Reward:
    """A weighted sum (weights default to 1) that also logs each reward on its own."""
    parts = [as_reward(r) for r in rewards]
    weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} rewards")
    return CombinedReward(list(zip(parts, weights, strict=True)), name=name)


def score_population(
    reward: Reward | Callable,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    columns: Mapping[str, list] | None = None,
    **extra,
) -> RewardResult:
    """Scores N x P completions (member x prompt) of the same P prompts; columns are P-long lists.

    Works from synchronous code whether or not an event loop is running; raises RewardError
    naming the reward, member and sample when a reward fails or returns NaN or inf. `extra` as in
    Reward.score (completion_ids, prompt_texts, trainer_state, log).
    """
    return as_reward(reward).score(prompts, completions, columns, **extra)


async def ascore_population(
    reward: Reward | Callable,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    columns: Mapping[str, list] | None = None,
    **extra,
) -> RewardResult:
    """score_population for callers inside an event loop."""
    return await as_reward(reward).ascore(prompts, completions, columns, **extra)
