"""The math of an EGGROLL population member, in pure torch (no vLLM import)."""

from .lora import lora_from_factors, member_delta, member_lora, member_state_dict, peft_config, write_peft_adapter
from .noise import NOISE_VERSION, NoiseKey, draw_block, many_factors, noise_epoch, pair_factors, stacked_factors
from .optim import OPTIMIZERS, Optimizer, OptimizerState, split_state
from .population import Population
from .shaping import SHAPINGS, shape_fitness
from .targets import DEFAULT_MODULES, Target, find_targets
from .update import (
    SCALINGS,
    apply_update,
    draw_coefficients,
    lowrank_sum,
    matrix_updates,
    merge_tolerance,
    update_factor,
)

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
