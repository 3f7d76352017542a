"""Rewards and tasks for es-serve: scoring N x P completions and the prompts they answer.

Quick reference (details in rewards/README.md):
- load_reward("numeric,length_penalty", weights=[1, 0.1]) -> Reward; reward.score(prompts,
  completions, columns) -> RewardResult(matrix, valid, per_reward).
- Reward functions follow TRL: fn(prompts, completions, **columns) -> list[float | None], or per
  sample fn(prompt, completion, **columns) -> float | None (@per_sample), sync or async.
- get_task("arithmetic", seed=0) -> Task with sample(n, step), eval_rows(n), default_reward;
  task_from_config(config.task) also builds DatasetTask (task.dataset: the user's own data).
"""

import lazy_loader

# Public names resolve on first use (lazy_loader): `es-serve train` reports a mistyped task or reward name
# without importing torch, aiohttp and the datasets stack first (seconds).
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "aio": ["run_sync"],
        "answers": ["exact", "final_answer", "last_number", "math_answer", "numeric"],
        "base": ["CombinedReward", "Reward"],
        "calling": ["FunctionReward", "batched", "call_style", "per_sample"],
        "countdown_rule": ["IllegalExpression", "countdown", "evaluate"],
        "dataset_task": ["DatasetTask", "DatasetTaskError", "load_dataset_task"],
        "errors": ["RewardError", "RewardLoadError"],
        "formatting": ["format_answer_tag", "format_number", "length_penalty", "regex_reward"],
        "loading": [
            "BUILTIN_REWARDS",
            "ENTRY_POINT_GROUP",
            "builtin_rewards",
            "entry_point_rewards",
            "load_reward",
            "resolve_reward",
        ],
        "remote": ["RemoteReward"],
        "result": ["Batch", "RewardResult"],
        "reward_log": ["RewardLog"],
        "scoring": ["as_reward", "ascore_population", "combine", "score_population"],
        "tasks": ["TASKS", "Task", "get_task", "register_task", "task_from_config", "task_names"],
    },
)
