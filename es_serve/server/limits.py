"""Admission to the completion queue: at most `max_pending_completions` requests waiting or being answered.

Past the bound a request is answered 429 with Retry-After at once, so a burst makes clients back off
instead of piling up behind the engine (each waiting request holds its body and a connection).
Handlers wrap their work in `async with gate.admit():` and turn `Full` into `too_many(...)`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi.responses import JSONResponse


class Full(RuntimeError):
    pass


class AdmissionGate:
    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.pending = limit, retry_after_s, 0

    @asynccontextmanager
    async def admit(self):
        # Runs on the event loop only, so the check and the increment cannot interleave.
        if self.pending >= self.limit:
            raise Full(
                f"{self.pending} completion requests are already waiting or running (at most {self.limit}, "
                f"--max-pending-completions); retry after {self.retry_after_s} s"
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1


def too_many(message: str, retry_after_s: int) -> JSONResponse:
    """429 in OpenAI's error shape (its client retries on 429 and honours Retry-After)."""
    body = {"error": {"message": message, "type": "rate_limit_error", "code": 429}, "detail": message}
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(retry_after_s)})
