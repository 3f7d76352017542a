"""The population: who is member i, which noise it uses and with which sign."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .noise import check_rank


@dataclass(frozen=True)
class Population:
    """N members perturbing every target matrix with rank-r noise of scale sigma.

    With antithetic pairs, members 2k and 2k+1 share draw k with signs +1 and -1, which cancels the
    even part of the fitness and roughly halves the variance of the update for the same N.
    """

    size: int
    rank: int = 1
    sigma: float = 1e-3
    antithetic: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"population size must be an integer >= 1, got {self.size!r}")
        if self.antithetic and self.size % 2:
            raise ValueError(
                f"population size {self.size} is odd, but antithetic pairs need an even size: "
                f"use {self.size + 1} or {self.size - 1}, or turn antithetic sampling off"
            )
        check_rank(self.rank)
        if not isinstance(self.sigma, (int, float)) or not math.isfinite(self.sigma) or self.sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")

    @property
    def draws(self) -> int:
        """Independent noise draws: N/2 pairs with antithetic sampling, else N."""
        return self.size // 2 if self.antithetic else self.size

    def draw_of(self, member: int) -> int:
        self._check_member(member)
        return member // 2 if self.antithetic else member

    def sign_of(self, member: int) -> int:
        self._check_member(member)
        return -1 if self.antithetic and member % 2 else 1

    def _check_member(self, member: int) -> None:
        if not 0 <= member < self.size:
            raise IndexError(f"member {member} is outside the population 0..{self.size - 1}")
