"""verl's reward files: `compute_score(data_source, solution_str, ground_truth, extra_info)`.

Loaded with the spec prefix `verl:` (`verl:path/to/file.py:compute_score`, `verl:file.py` meaning
its `compute_score`, or `verl:package.module:function`). Rows are read as verl's data files lay
them out: `data_source`, `reward_model` (a struct whose `ground_truth` is the gold answer; a plain
`ground_truth` column works too) and `extra_info`. `solution_str` is the completion's text. The
function returns a number, or a dict with `score` whose other numeric entries are logged as
metrics of the step, as verl reports them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

from .calling import SAMPLE, FunctionReward, reward_name

PREFIX = "verl:"


def verl_reward(compute_score: Callable, name: str | None = None) -> FunctionReward:
    if not callable(compute_score):
        raise TypeError(f"a verl reward must be a function, got {type(compute_score).__name__}")
    label = name or reward_name(compute_score)

    def score(completion: str, log_metric=None, **columns):
        result = compute_score(
            data_source=columns.get("data_source"),
            solution_str=completion,
            ground_truth=_ground_truth(columns),
            extra_info=columns.get("extra_info") or {},
        )
        if isinstance(result, Mapping):
            if "score" not in result:
                raise ValueError(f"returned a dict without 'score' (keys: {', '.join(map(str, result))})")
            for key, value in result.items():
                if key != "score" and log_metric is not None and _is_number(value):
                    log_metric(str(key), float(value))
            result = result["score"]
        return result

    return FunctionReward(score, name=label, style=SAMPLE, text_only=True)


def _ground_truth(columns: dict):
    model = columns.get("reward_model")
    if isinstance(model, Mapping) and "ground_truth" in model:
        return model["ground_truth"]
    if "ground_truth" in columns:
        return columns["ground_truth"]
    raise ValueError(
        "a verl reward needs the gold answer in a `reward_model` column ({'ground_truth': ...}) "
        f"or a `ground_truth` column; columns: {', '.join(sorted(columns)) or 'none'}"
    )


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
