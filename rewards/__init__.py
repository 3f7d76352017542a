"""Rewards and tasks for es-serve: scoring N x P completions and the prompts they answer.

Quick reference (details in rewards/README.md):
- load_reward("numeric,length_penalty", weights=[1, 0.1]) -> Reward; reward.score(prompts,
  completions, columns) -> RewardResult(matrix, valid, per_reward).
- Reward functions follow TRL: fn(prompts, completions, **columns) -> list[float | None], or per
  sample fn(prompt, completion, **columns) -> float | None (@per_sample), sync or async.
- get_task("arithmetic", seed=0) -> Task with sample(n, step), eval_rows(n), default_reward;
  task_from_config(config.task) also builds DatasetTask (task.dataset: the user's own data).
"""

from .aio import run_sync
from .answers import exact, final_answer, last_number, math_answer, numeric
from .base import CombinedReward, Reward
from .calling import FunctionReward, batched, call_style, per_sample
from .countdown_rule import IllegalExpression, countdown, evaluate
from .dataset_task import DatasetTask, DatasetTaskError, load_dataset_task
from .errors import RewardError, RewardLoadError
from .formatting import format_answer_tag, format_number, length_penalty, regex_reward
from .loading import (
    BUILTIN_REWARDS,
    ENTRY_POINT_GROUP,
    builtin_rewards,
    entry_point_rewards,
    load_reward,
    resolve_reward,
)
from .remote import RemoteReward
from .result import Batch, RewardResult
from .reward_log import RewardLog
from .scoring import as_reward, ascore_population, combine, score_population
from .tasks import TASKS, Task, get_task, register_task, task_from_config, task_names

__all__ = [
    "BUILTIN_REWARDS",
    "ENTRY_POINT_GROUP",
    "TASKS",
    "Batch",
    "CombinedReward",
    "DatasetTask",
    "DatasetTaskError",
    "FunctionReward",
    "IllegalExpression",
    "RemoteReward",
    "Reward",
    "RewardError",
    "RewardLoadError",
    "RewardLog",
    "RewardResult",
    "Task",
    "as_reward",
    "ascore_population",
    "batched",
    "builtin_rewards",
    "call_style",
    "combine",
    "countdown",
    "entry_point_rewards",
    "evaluate",
    "exact",
    "final_answer",
    "format_answer_tag",
    "format_number",
    "get_task",
    "last_number",
    "length_penalty",
    "load_dataset_task",
    "load_reward",
    "math_answer",
    "numeric",
    "per_sample",
    "regex_reward",
    "register_task",
    "resolve_reward",
    "run_sync",
    "score_population",
    "task_from_config",
    "task_names",
]
