"""Running the app under uvicorn so that SIGTERM and Ctrl-C end in a checkpoint and exit status 0."""

from __future__ import annotations

import errno
import logging
import signal
import socket

from .settings import ServerSettings

log = logging.getLogger("es_serve.server")
LEVELS = ("debug", "info", "warning", "error", "critical")


def setup_logging(level: str) -> None:
    """Console logging at `level` for es-serve and uvicorn; job logs (job.log) keep INFO regardless."""
    from .jobs import LOG_FORMAT

    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    console.setLevel(level.upper())
    root = logging.getLogger()
    root.addHandler(console)
    # The loggers pass INFO on so that each job's log file gets it; the console handler filters.
    root.setLevel(min(logging.INFO, logging.getLevelName(level.upper())))


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
    setup_logging(settings.log_level)
    if settings.host not in LOOPBACK and not settings.api_key:
        log.warning("listening on %s without --api-key; anyone who can reach it can start jobs", settings.host)
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
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through the handler above
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    server = Server(config)
    # uvicorn re-raises the signal it handled once it has shut down; with these handlers in place
    # that is a no-op, so a clean SIGTERM shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("serving on http://%s:%d (runs in %s)", settings.host, settings.port, settings.runs)
    server.run()
    return 0 if server.started else 1
