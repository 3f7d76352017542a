"""Plain Python reward functions, in TRL's calling convention or one sample at a time.

Batch form (TRL's): `fn(prompts, completions, **columns) -> list[float | None]`, called with keyword
arguments once per population member: `prompts` and `completions` are that member's P prompts and
completions, and every dataset column arrives as a keyword holding a P-long list. Per-sample form:
`fn(prompt, completion, **columns) -> float | None`, each column value for that one sample.
Either may be `async def`; async functions are called concurrently (bounded by max_concurrency).

As in TRL's GRPOTrainer, the prompts decide the form: plain prompts give strings, chat prompts
(lists of role/content messages) give `prompts` as message lists and each completion as
`[{"role": "assistant", "content": text}]`. When the trainer provides them, functions also get
`completion_ids` (token ids), `trainer_state` (the fields of transformers' TrainerState: `global_step`,
`max_steps`) and `log_metric` / `log_extra` (see rewards.reward_log). `text_only=True` (the
built-ins) keeps strings for chat prompts too.

How the form is decided, first rule that applies:
1. an explicit `@per_sample` or `@batched` decorator;
2. a parameter named `completions` or `prompts` means batch;
3. a parameter named `completion` or `prompt` means per sample;
4. only `**kwargs` means batch (TRL's `def f(completions, **kwargs)` style falls under rule 2).
Anything else cannot be called by name and is rejected when it is loaded.

A function without `**kwargs` is given only the arguments it names, so `def f(completion, answer)`
works; a named argument that no column provides is an error naming the available columns.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable

from .aio import gather_or_cancel
from .base import Reward
from .errors import RewardError, RewardLoadError
from .result import Batch

BATCH, SAMPLE = "batch", "sample"
_STYLE_ATTR = "__es_serve_reward_style__"
_NAME_ATTR = "__es_serve_reward_name__"
_RESERVED = {BATCH: ("prompts", "completions"), SAMPLE: ("prompt", "completion")}
# What the trainer passes besides prompts, completions and columns (TRL's names).
TRAINER_ARGUMENTS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


def per_sample(fn: Callable | None = None, /, *, name: str | None = None):
    """Marks `fn(prompt, completion, **columns) -> float | None` as a per-sample reward.

    Usable bare (`@per_sample`) or with a logging name (`@per_sample(name="correct")`).
    """
    return _mark(fn, SAMPLE, name)


def batched(fn: Callable | None = None, /, *, name: str | None = None):
    """Marks `fn(prompts, completions, **columns) -> list[float | None]` as a batch (TRL-style) reward."""
    return _mark(fn, BATCH, name)


def _mark(fn, style, name):
    def apply(f):
        setattr(f, _STYLE_ATTR, style)
        if name is not None:
            setattr(f, _NAME_ATTR, name)
        return f

    return apply if fn is None else apply(fn)


def call_style(fn: Callable) -> str:
    """'batch' or 'sample', by the rules in this module's docstring."""
    explicit = getattr(fn, _STYLE_ATTR, None)
    if explicit in (BATCH, SAMPLE):
        return explicit
    params = _parameters(fn)
    if params is None:
        return BATCH  # not introspectable (some C callables): assume TRL's convention
    if "completions" in params or "prompts" in params:
        return BATCH
    if "completion" in params or "prompt" in params:
        return SAMPLE
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return BATCH
    raise RewardLoadError(
        f"cannot call reward {reward_name(fn)!r} with signature {_describe(fn)}: it needs a `completions` "
        "parameter (TRL style: fn(prompts, completions, **columns) -> list) or a `completion` parameter "
        "(per sample: fn(prompt, completion, **columns) -> float), or an explicit @batched / @per_sample"
    )


def reward_name(fn: Callable) -> str:
    named = getattr(fn, _NAME_ATTR, None)
    if named:
        return named
    base = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(base, "__name__", None) or type(base).__name__
    return "lambda" if name == "<lambda>" else name


def _parameters(fn) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _describe(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


def _is_async(fn) -> bool:
    target = fn.func if isinstance(fn, functools.partial) else fn
    # A callable object is async when its __call__ is; looked up on the type, as calls do.
    return inspect.iscoroutinefunction(target) or (
        not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)
    )


class FunctionReward(Reward):
    """A Python function as a Reward; see the module docstring for the calling convention."""

    def __init__(
        self,
        fn: Callable,
        name: str | None = None,
        style: str | None = None,
        max_concurrency: int = 32,
        text_only: bool = False,
    ):
        if not callable(fn):
            raise RewardLoadError(f"a reward must be callable, got {type(fn).__name__}")
        if style not in (None, BATCH, SAMPLE):
            raise ValueError(f"style must be {BATCH!r} or {SAMPLE!r}, got {style!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.fn, self.name = fn, name or reward_name(fn)
        self.style = style or call_style(fn)
        self.is_async = _is_async(fn)
        self.max_concurrency = max_concurrency
        self.text_only = text_only
        params = _parameters(fn) or {}
        kinds = inspect.Parameter
        self._takes_all = not params or any(p.kind is kinds.VAR_KEYWORD for p in params.values())
        self._accepted = {n for n, p in params.items() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
        self._required = {
            n
            for n, p in params.items()
            if p.default is p.empty and p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        }
        positional_only = [n for n, p in params.items() if p.kind is kinds.POSITIONAL_ONLY and p.default is p.empty]
        if positional_only:
            raise RewardLoadError(
                f"reward {self.name!r} has positional-only parameters {positional_only}; rewards are called "
                "with keyword arguments (prompts=, completions=, <column>=), as in TRL"
            )

    async def compute(self, batch: Batch) -> list[list[float | None]]:
        self._check_arguments(batch)
        if self.style == BATCH:
            return await self._each(batch.members, lambda i: self._call(self._batch_kwargs(batch, i), member=i))
        flat = await self._each(
            batch.members * batch.size,
            lambda k: self._call(self._sample_kwargs(batch, *divmod(k, batch.size)), *divmod(k, batch.size)),
        )
        return [flat[i * batch.size : (i + 1) * batch.size] for i in range(batch.members)]

    async def _each(self, count: int, call) -> list:
        if not self.is_async:
            return [await call(k) for k in range(count)]
        gate = asyncio.Semaphore(self.max_concurrency)

        async def bounded(k):
            async with gate:
                return await call(k)

        return await gather_or_cancel(bounded(k) for k in range(count))

    async def _call(self, kwargs: dict, member: int, sample: int | None = None):
        try:
            out = self.fn(**kwargs)
            if inspect.isawaitable(out):
                out = await out
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"{type(exc).__name__}: {exc}", reward=self.name, member=member, sample=sample) from exc
        if self.style == SAMPLE and isinstance(out, list | tuple):
            raise RewardError(
                f"returned a {type(out).__name__}; a per-sample reward returns one number (or None)",
                reward=self.name,
                member=member,
                sample=sample,
            )
        return out

    def _batch_kwargs(self, batch: Batch, member: int) -> dict:
        # Copies: a reward that edits its arguments in place must not change what the next member sees.
        columns = {k: list(v) for k, v in batch.columns.items()}
        prompts, completions = self._forms(batch)
        kwargs = {"prompts": prompts, "completions": [completions(t) for t in batch.completions[member]], **columns}
        if batch.completion_ids is not None:
            kwargs["completion_ids"] = [list(ids) for ids in batch.completion_ids[member]]
        return self._select({**kwargs, **self._trainer_kwargs(batch)})

    def _sample_kwargs(self, batch: Batch, member: int, sample: int) -> dict:
        values = {k: v[sample] for k, v in batch.columns.items()}
        prompt = batch.prompts[sample]
        if batch.conversational:
            text = batch.prompt_texts[sample] if batch.prompt_texts is not None else batch.texts()[sample]
            prompt = text if self.text_only else [dict(m) for m in prompt]
        completion = batch.completions[member][sample]
        if batch.conversational and not self.text_only:
            completion = _assistant_message(completion)
        kwargs = {"prompt": prompt, "completion": completion, **values}
        if batch.completion_ids is not None:
            kwargs["completion_ids"] = list(batch.completion_ids[member][sample])
        return self._select({**kwargs, **self._trainer_kwargs(batch)})

    def _forms(self, batch: Batch):
        """(the prompts, a function making one completion) in the form this reward is given."""
        if batch.conversational and not self.text_only:
            return [[dict(m) for m in p] for p in batch.prompts], _assistant_message
        if batch.conversational:
            return batch.texts(), str
        return list(batch.prompts), str

    @staticmethod
    def _trainer_kwargs(batch: Batch) -> dict:
        kwargs = {}
        if batch.trainer_state is not None:
            kwargs["trainer_state"] = batch.trainer_state
        if batch.log is not None:
            kwargs["log_extra"], kwargs["log_metric"] = batch.log.log_extra, batch.log.log_metric
        return kwargs

    def _select(self, kwargs: dict) -> dict:
        return kwargs if self._takes_all else {k: v for k, v in kwargs.items() if k in self._accepted}

    def _check_arguments(self, batch: Batch) -> None:
        reserved = set(_RESERVED[BATCH] + _RESERVED[SAMPLE] + TRAINER_ARGUMENTS)
        clash = sorted(reserved & batch.columns.keys())
        if clash:
            raise RewardError(f"dataset columns {clash} clash with the reward's own arguments", reward=self.name)
        given = set(_RESERVED[self.style]) | batch.columns.keys() | self._trainer_kwargs(batch).keys()
        if batch.completion_ids is not None:
            given.add("completion_ids")
        missing = sorted(self._required - given)
        if missing:
            available = ", ".join(sorted(batch.columns)) or "none"
            raise RewardError(
                f"needs argument(s) {', '.join(missing)} but no such column was given (columns: {available})",
                reward=self.name,
            )


def _assistant_message(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]
