"""What a reward is given (a Batch) and what scoring returns (a RewardResult)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import RewardError


@dataclass(frozen=True)
class Batch:
    """One step's scoring input: P prompts, N x P completions (member x prompt), P-long columns."""

    prompts: list[str]
    completions: list[list[str]]
    columns: dict[str, list] = field(default_factory=dict)

    @property
    def members(self) -> int:
        return len(self.completions)

    @property
    def size(self) -> int:
        return len(self.prompts)

    @classmethod
    def make(cls, prompts: Sequence[str], completions: Sequence[Sequence[str]], columns: Mapping | None) -> Batch:
        prompts = list(prompts)
        if isinstance(completions, str) or any(isinstance(row, str) for row in completions):
            raise ValueError(
                "completions must be N x P, one list per population member (for a single model pass [completions])"
            )
        rows = [list(row) for row in completions]
        for i, row in enumerate(rows):
            if len(row) != len(prompts):
                raise ValueError(f"member {i} has {len(row)} completions for {len(prompts)} prompts")
        cols = {}
        for key, values in (columns or {}).items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence):
                raise ValueError(f"column {key!r} must be a list aligned with the prompts, got {type(values).__name__}")
            if len(values) != len(prompts):
                raise ValueError(f"column {key!r} has {len(values)} values for {len(prompts)} prompts")
            cols[key] = list(values)
        return cls(prompts, rows, cols)


@dataclass
class RewardResult:
    """Scores of one population on one step's prompts.

    matrix: float64 N x P (member x prompt); NaN where the reward said None ("no score").
    valid: bool N x P, False exactly where matrix is NaN; pass it to shape_fitness(valid=...).
    per_reward: each component's own matrix (unweighted), for logging; one entry for a single reward.
    """

    matrix: torch.Tensor
    valid: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    seconds: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def mean(self) -> float | None:
        """Mean over scored entries, None when nothing was scored."""
        values = self.matrix[self.valid]
        return float(values.mean()) if values.numel() else None


def check_value(value, *, reward: str, member: int | None, sample: int | None) -> float:
    """A reward's output as a float; None becomes NaN. Anything else non-numeric or non-finite raises."""
    if value is None:
        return math.nan
    if isinstance(value, str | bytes) or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        raise RewardError(
            f"returned {value!r} ({type(value).__name__}); a reward must be a number or None",
            reward=reward,
            member=member,
            sample=sample,
        )
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"returned {value!r}: {exc}", reward=reward, member=member, sample=sample) from None
    if not math.isfinite(x):
        raise RewardError(
            f"returned {x}; rewards must be finite numbers (return None for 'no score')",
            reward=reward,
            member=member,
            sample=sample,
        )
    return x


def check_row(values, *, reward: str, member: int, size: int, offset: int = 0) -> list[float]:
    """One member's list of rewards, checked for length and values (sample indices start at offset)."""
    if values is None or isinstance(values, str | bytes | Mapping):
        raise RewardError(
            f"returned {type(values).__name__}, expected a list of {size} numbers", reward=reward, member=member
        )
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()  # numpy arrays and tensors
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"returned {type(values).__name__}, expected a list of {size} numbers", reward=reward, member=member
        ) from None
    if len(values) != size:
        raise RewardError(f"returned {len(values)} rewards for {size} completions", reward=reward, member=member)
    return [check_value(v, reward=reward, member=member, sample=offset + j) for j, v in enumerate(values)]


def to_matrix(rows: Sequence, *, reward: str, members: int, size: int) -> torch.Tensor:
    """An N x P float64 tensor from N rows of rewards, every value checked (None becomes NaN)."""
    if len(rows) != members:
        raise RewardError(f"returned {len(rows)} rows of rewards for {members} members", reward=reward)
    checked = [check_row(row, reward=reward, member=i, size=size) for i, row in enumerate(rows)]
    return torch.tensor(checked, dtype=torch.float64).reshape(members, size)
