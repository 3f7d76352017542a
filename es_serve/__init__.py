"""The es-serve trainer: engines, the ES loop, configuration, run directories and export.

Public names resolve on first use (lazy_loader): `es-serve models` and the run-directory tools must not
pay for importing torch, transformers or vLLM (seconds each) when they do not need them.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "config": ["Config", "ConfigError", "load_config"],
        "engines.dense": ["DenseEngine"],
        "engines.vllm_engine": ["VLLMEngine"],
        "engines.ray_engine": ["RayEngine"],
        "export": ["export_run", "trained_weights"],
        "models": ["KNOWN_MODELS", "list_models", "resolve_model"],
        "run_dir": ["RunDir"],
        "trainer": ["Trainer", "eval_gain"],
        "types": ["Completion", "Generation", "PopulationResult", "Sampling"],
    },
)
