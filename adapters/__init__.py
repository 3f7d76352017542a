"""The math of an EGGROLL population member, in pure torch (no vLLM import)."""

import lazy_loader

# Public names resolve on first use (lazy_loader, the scientific Python packages' way): the configuration
# needs DEFAULT_MODULES only, and a mistyped key should be reported without first importing torch (two
# seconds).
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "lora": [
            "lora_from_factors",
            "member_delta",
            "member_lora",
            "member_state_dict",
            "peft_config",
            "write_peft_adapter",
        ],
        "noise": [
            "NOISE_VERSION",
            "NoiseKey",
            "draw_block",
            "many_factors",
            "noise_epoch",
            "pair_factors",
            "stacked_factors",
        ],
        "optim": ["OPTIMIZERS", "Optimizer", "OptimizerState", "split_state"],
        "population": ["Population"],
        "shaping": ["SHAPINGS", "shape_fitness"],
        "targets": ["DEFAULT_MODULES", "Target", "find_targets"],
        "update": [
            "SCALINGS",
            "apply_update",
            "draw_coefficients",
            "lowrank_sum",
            "matrix_updates",
            "merge_tolerance",
            "update_factor",
        ],
    },
)
