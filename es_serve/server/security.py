"""The guard in front of every route: the API key and the request-body bound.

Written as plain ASGI middleware so it also covers streaming responses and routes that read the
body themselves, and rejects a request before any handler runs.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

OPEN_PATHS = frozenset({"/health"})


async def _reply(send, status: int, message: str, kind: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}, "detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        # Compared as bytes: hmac.compare_digest refuses str with non-ASCII characters (a TypeError,
        # which was a 500), and header values arrive as bytes anyway.
        self.key_bytes = api_key.encode("utf-8") if api_key else b""

    def _authorized(self, scope) -> bool:
        if not self.api_key or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                # Anything but "Bearer <token>" is refused like a wrong key: no header shape reaches a 500.
                scheme, _, token = bytes(value).strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key_bytes)
        if scope["path"] == "/" and scope["method"] == "GET":
            # A browser cannot add a header when opening the dashboard, so the page alone also takes
            # ?key=; the page then sends it as a Bearer header on each of its API calls.
            query = bytes(scope.get("query_string", b"")).decode("latin-1")
            key = parse_qs(query, encoding="utf-8", errors="surrogateescape").get("key", [""])[0]
            return hmac.compare_digest(key.encode("utf-8", "surrogateescape"), self.key_bytes)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await _reply(
                send,
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                [(b"www-authenticate", b"Bearer")],
            )
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return await _reply(send, 413, self._too_large(), "invalid_request_error")
        # Read the body here, bounded, whatever the framing (chunked bodies carry no length).
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _reply(send, 413, self._too_large(), "invalid_request_error")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body} bytes; send a smaller request"
