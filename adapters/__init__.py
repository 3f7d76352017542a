"""The math of an EGGROLL population member, in pure torch (no vLLM import)."""

import importlib

# Public names resolve lazily, as es_serve's do: the configuration needs DEFAULT_MODULES only, and a
# mistyped key should be reported without first importing torch (two seconds).
_EXPORTS = {
    "lora_from_factors": "lora",
    "member_delta": "lora",
    "member_lora": "lora",
    "member_state_dict": "lora",
    "peft_config": "lora",
    "write_peft_adapter": "lora",
    "NOISE_VERSION": "noise",
    "NoiseKey": "noise",
    "draw_block": "noise",
    "many_factors": "noise",
    "noise_epoch": "noise",
    "pair_factors": "noise",
    "stacked_factors": "noise",
    "OPTIMIZERS": "optim",
    "Optimizer": "optim",
    "OptimizerState": "optim",
    "split_state": "optim",
    "Population": "population",
    "SHAPINGS": "shaping",
    "shape_fitness": "shaping",
    "DEFAULT_MODULES": "targets",
    "Target": "targets",
    "find_targets": "targets",
    "SCALINGS": "update",
    "apply_update": "update",
    "draw_coefficients": "update",
    "lowrank_sum": "update",
    "matrix_updates": "update",
    "merge_tolerance": "update",
    "update_factor": "update",
}


__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapters' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return __all__
