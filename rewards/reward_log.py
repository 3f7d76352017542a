"""What reward functions log while scoring one step: TRL's `log_metric` and `log_extra`.

As in TRL's GRPOTrainer, `log_metric(name, value)` records a scalar and the step reports the mean
of every value logged under that name during the step (all members' calls, every reward);
`log_extra(column, values)` adds per-sample values to a column, concatenated over calls (TRL's
completions table). The trainer writes both into that step's line of metrics.jsonl.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import defaultdict


class RewardLog:
    def __init__(self):
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list] = defaultdict(list)
        # Async rewards and a thread-pool reward may log from several threads at once.
        self._lock = threading.Lock()

    def log_metric(self, name: str, value: float) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_metric needs a metric name (a non-empty string), got {name!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
            raise ValueError(f"log_metric({name!r}, ...) needs a number, got {type(value).__name__}")
        with self._lock:
            self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        if not isinstance(column, str) or not column:
            raise ValueError(f"log_extra needs a column name (a non-empty string), got {column!r}")
        if isinstance(values, str | bytes):
            raise ValueError(f"log_extra({column!r}, ...) needs a list of values, one per sample")
        with self._lock:
            self.extra[column].extend(_jsonable(v) for v in values)

    def summary(self) -> tuple[dict[str, float | None], dict[str, list]]:
        """({metric: mean of the values logged}, {column: values}); NaN means become None (JSON null)."""
        means = {}
        for name, values in self.metrics.items():
            mean = sum(values) / len(values)
            means[name] = mean if math.isfinite(mean) else None
        return means, {k: list(v) for k, v in self.extra.items()}


def _jsonable(value):
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, numbers.Real):
        return _jsonable(float(value))
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
