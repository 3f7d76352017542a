"""What a reward is given (a Batch) and what scoring returns (a RewardResult)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import RewardError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Batch:
    """One step's scoring input: P prompts, N x P completions (member x prompt), P-long columns.

    A prompt is a string or, for chat data, a list of messages (TRL's "conversational" form; the
    first prompt decides, as in TRL). `prompt_texts` are the prompts as the model saw them (chat
    template applied). `completion_ids` (N x P token id lists), `trainer_state` and `log` (a
    RewardLog) are passed on to reward functions that ask for them.
    """

    prompts: list
    completions: list[list[str]]
    columns: dict[str, list] = field(default_factory=dict)
    completion_ids: list[list[list[int]]] | None = None
    prompt_texts: list[str] | None = None
    trainer_state: object | None = None
    log: object | None = None

    @property
    def members(self) -> int:
        return len(self.completions)

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def conversational(self) -> bool:
        """TRL's rule: chat form when the first prompt is a list of role/content messages."""
        first = self.prompts[0] if self.prompts else None
        return isinstance(first, list) and bool(first) and isinstance(first[0], Mapping) and "role" in first[0]

    def texts(self) -> list[str]:
        """The prompts as text: the rendered ones when given, else the prompts themselves."""
        if self.prompt_texts is not None:
            return list(self.prompt_texts)
        return [p if isinstance(p, str) else "".join(str(m.get("content", "")) for m in p) for p in self.prompts]

    @classmethod
    def make(
        cls,
        prompts: Sequence,
        completions: Sequence[Sequence[str]],
        columns: Mapping | None,
        *,
        completion_ids: Sequence | None = None,
        prompt_texts: Sequence[str] | None = None,
        trainer_state: object | None = None,
        log: object | None = None,
    ) -> Batch:
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
        ids = None
        if completion_ids is not None:
            ids = [[list(x) for x in row] for row in completion_ids]
            if [len(r) for r in ids] != [len(r) for r in rows]:
                raise ValueError("completion_ids must have the completions' N x P shape")
        texts = None
        if prompt_texts is not None:
            texts = list(prompt_texts)
            if len(texts) != len(prompts):
                raise ValueError(f"{len(texts)} prompt texts for {len(prompts)} prompts")
        return cls(prompts, rows, cols, ids, texts, trainer_state, log)


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
    import torch  # here: see rewards.base

    return torch.tensor(checked, dtype=torch.float64).reshape(members, size)
