"""Tasks: procedural prompts with gold columns, a fixed held-out split, and a default reward.

Every row has `prompt` (the user message as a plain string), `messages` (the same as a one-turn
chat for chat templates) and the task's gold columns, which reach reward functions as keyword
arguments. Splits are pure functions of (task name, seed): the held-out rows are the first
`eval_size` distinct problems of the eval stream, and training draws skip every held-out problem,
so train and eval are disjoint for any seed and any step.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from . import problems

_MAX_TRIES_PER_ROW = 1000


class Task:
    def __init__(
        self,
        name: str,
        generate: Callable[[random.Random], dict],
        default_reward: str,
        *,
        seed: int = 0,
        eval_size: int = 128,
        description: str = "",
    ):
        if eval_size < 1:
            raise ValueError(f"eval_size must be at least 1, got {eval_size}")
        self.name, self.generate, self.default_reward = name, generate, default_reward
        self.seed, self.eval_size, self.description = seed, eval_size, description
        self._eval = self._draw_unique(random.Random(f"{name}:{seed}:eval"), eval_size, exclude=frozenset())
        self._eval_keys = frozenset(key for key, _ in self._eval)

    def sample(self, n: int, step: int | random.Random | object) -> list[dict]:
        """n training rows, distinct where the problem space allows, never a held-out problem.

        `step` is a training step (the rows are then a pure function of task, seed and step) or a
        random.Random / numpy Generator to draw from.
        """
        if isinstance(step, random.Random):
            rng = step
        elif hasattr(step, "integers"):
            rng = random.Random(int(step.integers(2**63)))
        elif isinstance(step, int):
            rng = random.Random(f"{self.name}:{self.seed}:train:{step}")
        else:
            raise TypeError(f"sample(n, step) needs a step number or a random generator, got {type(step).__name__}")
        try:
            return [row for _, row in self._draw_unique(rng, n, exclude=self._eval_keys)]
        except ValueError:
            # A step asking for more prompts than there are distinct training problems repeats some.
            return [self._draw_one(rng, self._eval_keys)[1] for _ in range(n)]

    def eval_rows(self, n: int | None = None) -> list[dict]:
        """The first n held-out rows (all of them when n is None); the same for every call."""
        if n is None:
            n = self.eval_size
        if n > self.eval_size:
            raise ValueError(
                f"task {self.name!r} holds out {self.eval_size} eval prompts, {n} were asked for; "
                f"lower task.eval_prompts or build the task with eval_size={n}"
            )
        return [dict(row, messages=[dict(m) for m in row["messages"]]) for _, row in self._eval[:n]]

    def reward(self, **loader_options):
        """The task's default reward, loaded."""
        from .loading import load_reward

        return load_reward(self.default_reward, **loader_options)

    def _row(self, rng: random.Random) -> tuple[str, dict]:
        problem = dict(self.generate(rng))
        key = str(problem.pop("key", problem["prompt"]))
        prompt = problem.pop("prompt")
        return key, {"prompt": prompt, "messages": [{"role": "user", "content": prompt}], **problem}

    def _draw_one(self, rng, exclude) -> tuple[str, dict]:
        for _ in range(_MAX_TRIES_PER_ROW):
            key, row = self._row(rng)
            if key not in exclude:
                return key, row
        raise ValueError(f"task {self.name!r}: every problem drawn is held out; the problem space is too small")

    def _draw_unique(self, rng, n: int, exclude) -> list[tuple[str, dict]]:
        out, seen = [], set(exclude)
        for _ in range(n * _MAX_TRIES_PER_ROW):
            if len(out) == n:
                break
            key, row = self._row(rng)
            if key not in seen:
                seen.add(key)
                out.append((key, row))
        if len(out) < n:
            raise ValueError(f"task {self.name!r} has fewer than {n} distinct problems outside the held-out split")
        return out

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, seed={self.seed}, eval_size={self.eval_size}, default_reward={self.default_reward!r})"
        )


def _arithmetic(seed=0, eval_size=None, max_operand=20, ops="+-"):
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic ops must be a string of + - *, got {ops!r}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be at least 1, got {max_operand}")
    if eval_size is None:
        # A quarter of the distinct problems at most, so small operand ranges still leave most
        # problems for training.
        side = max_operand + 1
        space = sum(side * (side + 1) // 2 if op == "-" else side * side for op in set(ops))
        eval_size = min(128, space // 4)
    return Task(
        "arithmetic",
        functools.partial(problems.arithmetic, max_operand=max_operand, ops=ops),
        "numeric",
        seed=seed,
        eval_size=eval_size,
        description=f"a {ops[0]} b with operands 0..{max_operand}, answered with just the number",
    )


def _gsm(seed=0, eval_size=256):
    return Task(
        "gsm",
        problems.word_problem,
        "numeric",
        seed=seed,
        eval_size=eval_size,
        description="one- and two-step word problems with small numbers, GSM8K style",
    )


def _countdown(seed=0, eval_size=256, count=3, max_number=20, max_target=100):
    return Task(
        "countdown",
        functools.partial(problems.countdown, count=count, max_number=max_number, max_target=max_target),
        "countdown",
        seed=seed,
        eval_size=eval_size,
        description=f"reach a target from {count} numbers with + - * /, each number at most once",
    )


TASKS: dict[str, Callable[..., Task]] = {"arithmetic": _arithmetic, "gsm": _gsm, "countdown": _countdown}


def task_names() -> list[str]:
    return sorted(TASKS)


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Adds a task; `factory(seed=..., **options)` returns a Task."""
    TASKS[name] = factory


def get_task(name: str, seed: int = 0, **options) -> Task:
    """The task `name` with its splits drawn from `seed`; options go to its factory (eval_size, ...)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(task_names())}")
    try:
        return TASKS[name](seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"task {name!r}: {exc}") from None


def task_from_config(cfg, *, data_dir=None, restricted: bool = False):
    """The task a TaskConfig names: a built-in task, or a DatasetTask when `task.dataset` is set.

    `restricted` (server jobs): dataset files only inside `data_dir`. Errors are ValueErrors; those
    about the data carry `.field`, the configuration key to fix.
    """
    from .dataset_task import DatasetTaskError, load_dataset_task

    if cfg.dataset:
        if cfg.name in TASKS:
            raise DatasetTaskError(
                f"task.name={cfg.name!r} is a built-in task but task.dataset is set too; drop task.name "
                "(or give it a label of your own) to train on the dataset",
                "task.name",
            )
        return load_dataset_task(cfg, data_dir=data_dir, restricted=restricted)
    for key, default in (("eval_dataset", None), ("eval_split", None), ("split", "train"), ("prompt_column", "prompt")):
        if getattr(cfg, key) != default:
            raise DatasetTaskError(f"task.{key} applies to dataset tasks only: set task.dataset too", f"task.{key}")
    return get_task(cfg.name, seed=cfg.seed)
