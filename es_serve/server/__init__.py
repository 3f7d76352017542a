"""`es-serve serve`: training jobs, live metrics and OpenAI-compatible completions over HTTP.

Public names resolve on first use (lazy_loader), so that `es-serve serve` can refuse a busy port or a
bad flag before paying for the torch and FastAPI imports.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "app": ["create_app"],
        "engine_slot": ["EngineSlot", "LockedEngine"],
        "jobs": ["JobManager", "JobStore"],
        "run": ["serve"],
        "settings": ["ServerSettings"],
        "validation": ["FieldErrors", "parse_job"],
    },
)
