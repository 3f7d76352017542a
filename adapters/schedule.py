"""Learning-rate and sigma schedules: the value a quantity takes at ES step t of a run of T steps.

Steps count from 1 (the first update) to T (train.steps). With w warmup steps, step t <= w uses
base * t / w, so the first step already moves and step w reaches base. After warmup the value decays
from base at step w + 1 to base * min_ratio at step T:
    p = (t - w - 1) / (T - w - 1), clipped to [0, 1] (p = 1 when T - w - 1 <= 0)
    constant: base
    linear:   base * (1 - (1 - min_ratio) p)
    cosine:   base * (min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2)
Steps past T (a run resumed with more train.steps re-plans with the new T) stay at the last value.
The trainer writes each step's lr and sigma into its replay line, so a replay never recomputes them.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def scheduled(base: float, kind: str, step: int, total: int, min_ratio: float = 0.0, warmup: int = 0) -> float:
    """The value of a quantity with value `base` under schedule `kind` at step `step` (1-based) of `total`."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    if step < 1:
        raise ValueError(f"schedule steps count from 1, got {step}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio!r}")
    if warmup < 0:
        raise ValueError(f"warmup steps must be >= 0, got {warmup}")
    if step <= warmup:
        return base * step / warmup
    if kind == "constant":
        return base
    span = total - warmup - 1
    p = 1.0 if span <= 0 else min(max((step - warmup - 1) / span, 0.0), 1.0)
    if kind == "linear":
        return base * (1 - (1 - min_ratio) * p)
    return base * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * p)) / 2)
