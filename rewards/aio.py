"""Running reward coroutines from the trainer's synchronous code."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Runs the coroutine `make()` to completion and returns its result, from any calling context.

    `make` is a factory so the coroutine is created on the loop that runs it. With no loop running
    in this thread a private one is started; inside a running loop (a notebook, an async server)
    that loop cannot be re-entered, so a fresh loop runs in a worker thread while this thread waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(make))
    with ThreadPoolExecutor(1, thread_name_prefix="es-serve-reward") as pool:
        return pool.submit(lambda: asyncio.run(_await(make))).result()


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


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
