"""Server-sent events for a job: one `step` event per metrics line, then one `end` event.

The stream reads the run directory's metrics.jsonl, so a client that connects late (or after a
server restart) still receives every step from the first, and `Last-Event-ID` (the step number)
resumes a broken stream where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from .jobs import FINISHED, JobManager, summary

KEEPALIVE_S = 15.0


def sse(event: str, data: dict, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


class _Tail:
    """New complete lines of a JSONL file since the last read (a torn last line waits for its end)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


async def job_events(manager: JobManager, job_id: str, after: int = -1, poll_s: float = 0.2) -> AsyncIterator[str]:
    job = manager.get(job_id)
    tail = _Tail(Path(job["run_dir"]) / "metrics.jsonl")
    last_sent = time.monotonic()
    while True:
        # Status first, lines second: a finished job's last line is on disk before its status changes.
        job = manager.get(job_id)
        for record in tail.read():
            step = record.get("step", 0)
            if step > after:
                after = step
                last_sent = time.monotonic()
                yield sse("step", summary(record), step)
        if job["status"] in FINISHED:
            yield sse("end", job)
            return
        if manager.closing:
            yield sse("shutdown", {"id": job_id, "message": "the server is stopping; the job resumes when it restarts"})
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(poll_s)
