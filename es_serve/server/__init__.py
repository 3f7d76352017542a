"""`es-serve serve`: training jobs, live metrics and OpenAI-compatible completions over HTTP.

Public names are resolved lazily, so that `es-serve serve` can refuse a busy port or a bad flag
before paying for the torch and FastAPI imports.
"""

import importlib

_EXPORTS = {
    "create_app": "app",
    "EngineSlot": "engine_slot",
    "LockedEngine": "engine_slot",
    "JobManager": "jobs",
    "JobStore": "jobs",
    "serve": "run",
    "ServerSettings": "settings",
    "FieldErrors": "validation",
    "parse_job": "validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'es_serve.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return __all__
