"""Running the app under uvicorn so that SIGTERM and Ctrl-C end in a checkpoint and exit status 0."""

from __future__ import annotations

import errno
import signal
import socket
import sys

from .settings import ServerSettings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_port(host: str, port: int) -> None:
    """Fails with one clear line before any model work when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} on {host} is already in use; pick another with --port") from None
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(settings: ServerSettings) -> int:
    import uvicorn

    from .app import create_app

    check_port(settings.host, settings.port)
    if settings.host not in LOOPBACK and not settings.api_key:
        print(
            f"es-serve: warning: listening on {settings.host} without --api-key; anyone who can reach it can "
            "start jobs",
            file=sys.stderr,
        )
    app = create_app(settings)
    manager = app.state.manager

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Stop the job first so that open event streams end and the graceful shutdown can finish.
            manager.request_stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    server = Server(config)
    # uvicorn re-raises the signal it handled once it has shut down; with these handlers in place
    # that is a no-op, so a clean SIGTERM shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"es-serve: serving on http://{settings.host}:{settings.port} (runs in {settings.runs})", flush=True)
    server.run()
    return 0 if server.started else 1
