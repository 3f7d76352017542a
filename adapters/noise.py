"""Seeded low-rank noise: every perturbation is a pure function of a small key.

A member's noise is never stored or sent anywhere; any process that knows the key regenerates the
exact numbers. That is what lets the update travel as seeds plus fitness values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseKey:
    """Identifies one Gaussian draw Z of shape (m + n, r) for one matrix of one antithetic pair."""

    seed: int
    epoch: int
    pair: int
    layer: int
    module: str

    def generator_seed(self) -> int:
        # A cryptographic hash rather than arithmetic on the fields: seed + layer style mixing gives
        # colliding or correlated streams for neighbouring keys (pair 1 layer 0 vs pair 0 layer 1).
        text = f"eggroll/{self.seed}/{self.epoch}/{self.pair}/{self.layer}/{self.module}"
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def pair_factors(key: NoiseKey, m: int, n: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m x r) and B (n x r) for one pair and one matrix, float32, on the CPU.

    Drawn on the CPU generator whatever the target device, because torch's CPU Philox stream is the
    one that is identical across processes, machines and torch builds with and without CUDA.
    """
    check_rank(rank)
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive, got ({m}, {n})")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key.generator_seed())
    z = torch.randn(m + n, rank, generator=gen, dtype=torch.float32)
    return z[:m], z[m:]


def stacked_factors(
    seed: int, epoch: int, pairs: range | list[int], layer: int, module: str, m: int, n: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of many pairs for one matrix: A (pairs, m, r) and B (pairs, n, r)."""
    a_list, b_list = [], []
    for k in pairs:
        a, b = pair_factors(NoiseKey(seed, epoch, k, layer, module), m, n, rank)
        a_list.append(a)
        b_list.append(b)
    return torch.stack(a_list), torch.stack(b_list)


def noise_epoch(step: int, reuse: int) -> int:
    """Noise reuse: the same pair noise serves `reuse` consecutive steps."""
    if reuse < 1:
        raise ValueError(f"noise reuse must be >= 1 step, got {reuse!r}")
    return step // reuse
