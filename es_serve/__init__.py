"""The es-serve trainer: engines, the ES loop, configuration, run directories and export.

Public names are resolved lazily: `es-serve models` and the run-directory tools must not pay for
importing torch, transformers or vLLM (seconds each) when they do not need them.
"""

import importlib

_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "DenseEngine": "dense",
    "VLLMEngine": "vllm_engine",
    "RayEngine": "ray_engine",
    "export_run": "export",
    "trained_weights": "export",
    "KNOWN_MODELS": "models",
    "list_models": "models",
    "resolve_model": "models",
    "RunDir": "run_dir",
    "Trainer": "trainer",
    "eval_gain": "trainer",
    "Completion": "types",
    "Generation": "types",
    "PopulationResult": "types",
    "Sampling": "types",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'es_serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return __all__
