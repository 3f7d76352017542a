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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DEFAULT_MODULES",
    "NOISE_VERSION",
    "OPTIMIZERS",
    "SCALINGS",
    "SHAPINGS",
    "NoiseKey",
    "Optimizer",
    "OptimizerState",
    "Population",
    "Target",
    "apply_update",
    "draw_coefficients",
    "find_targets",
    "lora_from_factors",
    "lowrank_sum",
    "draw_block",
    "many_factors",
    "matrix_updates",
    "merge_tolerance",
    "member_delta",
    "member_lora",
    "member_state_dict",
    "noise_epoch",
    "pair_factors",
    "peft_config",
    "shape_fitness",
    "split_state",
    "stacked_factors",
    "update_factor",
    "write_peft_adapter",
]
