"""The Reward interface the trainer calls, and weighted combinations of rewards."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .aio import gather_or_cancel, run_sync
from .errors import RewardError
from .result import Batch, RewardResult, to_matrix

if TYPE_CHECKING:
    import torch


class Reward:
    """Scores N x P completions. Subclasses implement `compute` (or `breakdown` for composites).

    `score` is what the synchronous trainer calls; `ascore` is the same for callers that already
    run an event loop.
    """

    name: str = "reward"

    def score(
        self,
        prompts: Sequence,
        completions: Sequence[Sequence[str]],
        columns: Mapping[str, list] | None = None,
        **extra,
    ) -> RewardResult:
        """Scores N x P completions. `extra` (keyword only, all optional): completion_ids, prompt_texts,
        trainer_state, log; see Batch.make."""
        return run_sync(lambda: self.ascore(prompts, completions, columns, **extra))

    async def ascore(
        self,
        prompts: Sequence,
        completions: Sequence[Sequence[str]],
        columns: Mapping[str, list] | None = None,
        **extra,
    ) -> RewardResult:
        import torch  # here, not at the top: a mistyped reward name is reported without torch's 2 s import

        batch = Batch.make(prompts, completions, columns, **extra)
        started = time.perf_counter()
        total, parts = await self.breakdown(batch)
        return RewardResult(total, ~torch.isnan(total), parts, time.perf_counter() - started)

    async def breakdown(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the matrix the trainer shapes, {component name: its own matrix})."""
        rows = await self.compute(batch)
        matrix = to_matrix(rows, reward=self.name, members=batch.members, size=batch.size)
        return matrix, {self.name: matrix}

    async def compute(self, batch: Batch) -> list[list[float | None]]:
        """N rows of P rewards; None is "no score", NaN and inf are errors."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(batch)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class CombinedReward(Reward):
    """A weighted sum of rewards, each also reported on its own.

    As in TRL, a component that returns None for a sample is left out of that sample's sum; the
    sample has no score only when every component returned None. A weight of 0 keeps a reward
    for logging without letting it steer training.
    """

    def __init__(self, parts: Sequence[tuple[Reward, float]], name: str = "total"):
        if not parts:
            raise ValueError("CombinedReward needs at least one reward")
        self.parts = [(reward, float(weight)) for reward, weight in parts]
        self.name = name

    async def breakdown(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch

        results = await gather_or_cancel(reward.breakdown(batch) for reward, _ in self.parts)
        total = torch.zeros(batch.members, batch.size, dtype=torch.float64)
        scored = torch.zeros(batch.members, batch.size, dtype=torch.bool)
        per_reward: dict[str, torch.Tensor] = {}
        for (_, weight), (matrix, components) in zip(self.parts, results, strict=True):
            for key, value in components.items():
                per_reward[_unique(key, per_reward)] = value
            ok = ~torch.isnan(matrix)
            total += torch.where(ok, weight * matrix, torch.zeros_like(matrix))
            scored |= ok
        if not torch.isfinite(total).all():
            i, p = (int(x) for x in (~torch.isfinite(total)).nonzero()[0])
            raise RewardError(f"weighted sum is {total[i, p].item()}", reward=self.name, member=i, sample=p)
        total[~scored] = torch.nan
        return total, per_reward

    def __repr__(self) -> str:
        inner = ", ".join(f"{weight:g}*{reward.name}" for reward, weight in self.parts)
        return f"CombinedReward({inner})"


def _unique(key: str, taken: Mapping) -> str:
    if key not in taken:
        return key
    n = 2
    while f"{key}_{n}" in taken:
        n += 1
    return f"{key}_{n}"
