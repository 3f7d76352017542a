"""Gathers concurrent completion requests for a few milliseconds and answers them with one `generate`.

Engine calls are serialized, so answering 200 concurrent requests one by one would take 200 engine
calls; gathering them lets one batched call serve all of them. Requests are grouped by target
weights and decoding settings, since one `generate` call takes one Sampling.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..types import Completion, Sampling


@dataclass
class Pending:
    target: str  # a job id or a model name: whose weights answer
    prompts: list[str | list[dict]]  # text prompts, or chat message lists rendered under the engine lock
    sampling: Sampling
    own_seed: bool  # a sampled request with an explicit seed: batched alone, so its samples are reproducible
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    generate_seconds: float = 0.0
    last_batch_size: int = 0

    @property
    def tok_s(self) -> float | None:
        return self.completion_tokens / self.generate_seconds if self.generate_seconds > 0 else None


class CompletionBatcher:
    """`run_group(target, sampling, prompts) -> (completions, prompt_token_counts)` runs in a thread.

    It may raise for the whole group, or return an Exception in place of a prompt's result when
    only that prompt is bad (for example too long for the model).
    """

    def __init__(self, run_group: Callable, window_s: float = 0.005, max_batch: int = 512):
        self.run_group, self.window_s, self.max_batch = run_group, window_s, max_batch
        self.queue: asyncio.Queue[Pending] | None = None
        self.task: asyncio.Task | None = None
        self.stats = BatchStats()

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, target: str, prompts: list, sampling: Sampling, own_seed: bool = False):
        """One request's completions (one per prompt, in order) and its prompt token count."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(target, prompts, sampling, own_seed, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0].prompts)
            deadline = time.monotonic() + self.window_s
            while size < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    item = (
                        self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(item)
                size += len(item.prompts)
            for group in _groups(batch):
                await self._run(group)

    async def _run(self, group: list[Pending]) -> None:
        head = group[0]
        prompts = [p for item in group for p in item.prompts]
        started = time.perf_counter()
        try:
            results, prompt_tokens = await asyncio.to_thread(self.run_group, head.target, head.sampling, prompts)
        except Exception as exc:
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        stats = self.stats
        stats.batches += 1
        stats.requests += len(group)
        stats.last_batch_size = len(prompts)
        stats.generate_seconds += seconds
        stats.completion_tokens += sum(len(r.token_ids) for r in results if isinstance(r, Completion))
        stats.prompt_tokens += sum(prompt_tokens)
        offset = 0
        for item in group:
            mine = results[offset : offset + len(item.prompts)]
            counts = prompt_tokens[offset : offset + len(item.prompts)]
            offset += len(item.prompts)
            if item.future.done():  # the client went away
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result((mine, sum(counts)))


def _groups(batch: list[Pending]) -> list[list[Pending]]:
    groups: dict[tuple, list[Pending]] = {}
    # Unseeded sampled requests share one fresh seed per batch, so they differ from batch to batch.
    fresh = random.randrange(2**31 - 1)
    for i, item in enumerate(batch):
        sampling = item.sampling
        if sampling.temperature > 0 and not item.own_seed:
            sampling = Sampling(sampling.max_tokens, sampling.temperature, sampling.top_p, fresh)
            item.sampling = sampling
        key = (item.target, sampling, i if item.own_seed else None)
        groups.setdefault(key, []).append(item)
    return list(groups.values())
