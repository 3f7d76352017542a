"""A reward computed by an HTTP reward server, in OpenRLHF's remote reward model format.

Protocol: one POST of a JSON object per batch of samples,
    {"query": [prompt + completion, ...], "prompts": [prompt, ...], "labels": [gold or null, ...]}
answered with 200 and {"rewards": [float or null, ...]}, one per query and in the same order.
`labels` come from the dataset column `label_column` (default "answer"). Other response keys are
ignored.

A step's N x P samples are cut into requests of `batch_size`; at most `max_concurrency` requests
are in flight, at most `rate_limit` start in any `period` seconds (retries included), each may
take `timeout` seconds. Connection errors, timeouts and HTTP 408/429/5xx are retried `retries`
times after exponential backoff (backoff, 2 backoff, ... capped at max_backoff). Any other
status, or a malformed answer, fails at once: retrying would not change it. A request that still
fails raises RewardError and cancels the rest, so the step fails before any weight changes.
"""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
from asyncio_throttle import Throttler

from .aio import gather_or_cancel
from .base import Reward
from .errors import RewardError
from .result import Batch

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RemoteReward(Reward):
    def __init__(
        self,
        url: str,
        *,
        name: str = "remote",
        label_column: str = "answer",
        batch_size: int = 32,
        max_concurrency: int = 4,
        rate_limit: int | None = None,
        period: float = 1.0,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        jitter: float = 0.1,
        headers: dict[str, str] | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server URL must start with http:// or https://, got {url!r}")
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("max_concurrency", max_concurrency, 1),
            ("retries", retries, 0),
        ):
            if value < low:
                raise ValueError(f"{key} must be at least {low}, got {value}")
        if timeout <= 0 or period <= 0 or backoff < 0 or jitter < 0:
            raise ValueError("timeout and period must be positive; backoff and jitter not negative")
        if rate_limit is not None and rate_limit < 1:
            raise ValueError(f"rate_limit must be at least 1 request per period (or None), got {rate_limit}")
        self.url, self.name, self.label_column = url, name, label_column
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.timeout, self.retries, self.backoff, self.max_backoff, self.jitter = (
            timeout,
            retries,
            backoff,
            max_backoff,
            jitter,
        )
        self.headers = dict(headers or {})
        # Kept across steps: the limit must hold over step boundaries too, and the throttler keeps
        # only monotonic timestamps, so it is safe to share between event loops.
        self.throttler = Throttler(rate_limit, period) if rate_limit else None

    async def compute(self, batch: Batch) -> list[list[float | None]]:
        samples = [(i, p) for i in range(batch.members) for p in range(batch.size)]
        chunks = [samples[k : k + self.batch_size] for k in range(0, len(samples), self.batch_size)]
        labels = batch.columns.get(self.label_column)
        gate = asyncio.Semaphore(self.max_concurrency)
        connector = aiohttp.TCPConnector(limit=self.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        headers = {"Content-Type": "application/json", **self.headers}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
            answers = await gather_or_cancel(self._request(session, gate, batch, labels, chunk) for chunk in chunks)
        flat = [value for answer in answers for value in answer]
        return [flat[i * batch.size : (i + 1) * batch.size] for i in range(batch.members)]

    async def _request(self, session, gate, batch: Batch, labels, chunk) -> list:
        member, sample = chunk[0]
        where = _describe(chunk)
        # OpenRLHF's format is text: chat prompts go as the model saw them, chat template applied.
        texts = batch.texts()
        try:
            body = json.dumps(
                {
                    "query": [texts[p] + batch.completions[i][p] for i, p in chunk],
                    "prompts": [texts[p] for _, p in chunk],
                    "labels": [labels[p] if labels is not None else None for _, p in chunk],
                },
                default=str,
            )
        except (TypeError, ValueError) as exc:
            raise RewardError(
                f"cannot encode the request: {exc}", reward=self.name, member=member, sample=sample
            ) from None
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (1 + self.jitter * random.random()))
            async with gate:
                if self.throttler is not None:
                    await self.throttler.acquire()
                try:
                    async with session.post(self.url, data=body) as response:
                        text = await response.text()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    continue
            if status in RETRY_STATUSES:
                last = f"HTTP {status}: {text[:200]}"
                continue
            if status != 200:
                raise RewardError(
                    f"POST {self.url} for {where} answered HTTP {status}: {text[:200]}",
                    reward=self.name,
                    member=member,
                    sample=sample,
                )
            return self._rewards(text, len(chunk), where, member, sample)
        raise RewardError(
            f"POST {self.url} for {where} failed after {self.retries + 1} attempts; last error: {last}",
            reward=self.name,
            member=member,
            sample=sample,
        )

    def _rewards(self, text: str, expected: int, where: str, member: int, sample: int) -> list:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list):
            got = f"keys {sorted(data)}" if isinstance(data, dict) else repr(text[:200])
            raise RewardError(
                f"reward server answered {got} for {where}; expected a JSON object with a 'rewards' list",
                reward=self.name,
                member=member,
                sample=sample,
            )
        if len(rewards) != expected:
            raise RewardError(
                f"reward server returned {len(rewards)} rewards for {expected} queries ({where})",
                reward=self.name,
                member=member,
                sample=sample,
            )
        return rewards

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, name={self.name!r})"


def _describe(chunk) -> str:
    (i0, p0), (i1, p1) = chunk[0], chunk[-1]
    return f"samples (member {i0}, sample {p0}) to (member {i1}, sample {p1})"
