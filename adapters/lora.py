"""A population member as a rank-r LoRA adapter (PEFT layout: delta = lora_B @ lora_A)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .noise import NoiseKey, many_factors, pair_factors
from .population import Population
from .targets import Target


def lora_from_factors(a: torch.Tensor, b: torch.Tensor, sign: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (r x n) and lora_B (m x r) with lora_B @ lora_A = sign * sigma / sqrt(r) * A B^T.

    sqrt(sigma) goes on each side so neither factor is tiny in low precision: with sigma = 1e-3 a
    bf16 adapter holding sigma on one side would lose digits the other side never needs.
    """
    rank = a.shape[-1]
    lora_a = math.sqrt(sigma) * b.transpose(-1, -2)
    lora_b = (sign * math.sqrt(sigma / rank)) * a
    return lora_a.contiguous(), lora_b.contiguous()


def member_lora(
    pop: Population, member: int, target: Target, seed: int, epoch: int, noise: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    key = NoiseKey(seed, epoch, pop.draw_of(member), target.layer, target.module)
    a, b = pair_factors(key, target.out_features, target.in_features, pop.rank, noise)
    return lora_from_factors(a, b, pop.sign_of(member), pop.sigma)


def member_delta(
    pop: Population, member: int, target: Target, seed: int, epoch: int, dtype=torch.float64, noise: int | None = None
) -> torch.Tensor:
    """E_i for one matrix, materialised (m x n); for references and tests, never on the hot path."""
    lora_a, lora_b = member_lora(pop, member, target, seed, epoch, noise)
    return lora_b.to(dtype) @ lora_a.to(dtype)


def member_state_dict(
    pop: Population, member: int, targets: Sequence[Target], seed: int, epoch: int, noise: int | None = None
) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names; every matrix's noise drawn in one pass."""
    keys = [NoiseKey(seed, epoch, pop.draw_of(member), t.layer, t.module) for t in targets]
    factors = many_factors(keys, [(t.out_features, t.in_features) for t in targets], pop.rank, noise)
    tensors = {}
    for target, (a, b) in zip(targets, factors, strict=True):
        lora_a, lora_b = lora_from_factors(a, b, pop.sign_of(member), pop.sigma)
        tensors[f"{target.peft_prefix}.lora_A.weight"] = lora_a
        tensors[f"{target.peft_prefix}.lora_B.weight"] = lora_b
    return tensors


def peft_config(rank: int, modules: Sequence[str], base_model: str = "") -> dict:
    # lora_alpha = r makes PEFT's and vLLM's scaling alpha / r equal 1: the tensors carry all of it.
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(set(modules)),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }


def write_peft_adapter(
    path: str | os.PathLike,
    pop: Population,
    member: int,
    targets: Sequence[Target],
    seed: int,
    epoch: int,
    base_model: str = "",
    noise: int | None = None,
) -> Path:
    """An adapter directory that `peft.PeftModel.from_pretrained` and vLLM's `LoRARequest` load."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = member_state_dict(pop, member, targets, seed, epoch, noise)
    # Written under temporary names and renamed so a reader never sees half an adapter.
    tmp_weights, tmp_config = path / ".adapter_model.tmp", path / ".adapter_config.tmp"
    save_file(tensors, str(tmp_weights))
    tmp_config.write_text(json.dumps(peft_config(pop.rank, [t.module for t in targets], base_model)))
    os.replace(tmp_weights, path / "adapter_model.safetensors")
    os.replace(tmp_config, path / "adapter_config.json")
    return path
