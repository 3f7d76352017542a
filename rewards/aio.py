"""Running reward coroutines from the trainer's synchronous code."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .errors import RewardError

T = TypeVar("T")
# The deadline (time.monotonic) of the call_with_timeout running in this thread, if any.
_deadline = threading.local()


class RewardTimeout(RewardError):
    """Scoring took longer than reward.timeout_s; the step fails before any weight changes."""


def call_with_timeout(fn: Callable[[], T], timeout: float | None, what: str = "reward") -> T:
    """`fn()`, or RewardTimeout after `timeout` seconds.

    The call runs in a daemon thread that is abandoned on timeout. A thread rather than a process:
    rewards are arbitrary callables (closures, TRL functions, dataset columns, the trainer's
    log_metric) that need not pickle, and forking a process that hosts vLLM's threads is unsafe.
    Python cannot kill a thread, so a hung synchronous reward keeps its thread until it returns;
    coroutines (async rewards, reward servers) are cancelled at the deadline, so their connections
    close. Nothing the abandoned call returns later is used.
    """
    if timeout is None:
        return fn()
    box: dict = {}

    def target():
        _deadline.value = time.monotonic() + timeout
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="es-serve-reward", daemon=True)
    thread.start()
    thread.join(timeout)
    # Alive: a synchronous reward still running. TimeoutError: the coroutines were cancelled at the deadline.
    if thread.is_alive() or type(box.get("error")) is TimeoutError:
        raise RewardTimeout(
            f"no result after {timeout:g} s (reward.timeout_s); the step failed before any weight changed, so it "
            "can be rerun: raise reward.timeout_s or make the reward faster",
            reward=what,
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Runs the coroutine `make()` to completion and returns its result, from any calling context.

    `make` is a factory so the coroutine is created on the loop that runs it. With no loop running
    in this thread a private one is started; inside a running loop (a notebook, an async server)
    that loop cannot be re-entered, so a fresh loop runs in a worker thread while this thread waits.
    """
    deadline = getattr(_deadline, "value", None)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(make, deadline))
    with ThreadPoolExecutor(1, thread_name_prefix="es-serve-reward") as pool:
        return pool.submit(lambda: asyncio.run(_await(make, deadline))).result()


async def _await(make: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
    if deadline is None:
        return await make()
    # Under call_with_timeout: cancel the coroutines at the deadline rather than leave them running.
    return await asyncio.wait_for(make(), max(deadline - time.monotonic(), 0.0))


async def gather_or_cancel(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first exception cancels everything still running.

    A failed reward fails the whole step, so requests still in flight are wasted work (and would
    keep hitting a reward server that may be in trouble). The exception is raised as is, not
    wrapped in an ExceptionGroup as a TaskGroup would, so callers can catch RewardError directly.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
