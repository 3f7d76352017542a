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

    Drawn on the CPU generator whatever the target device, because torch's CPU stream (mt19937) is
    the one that is identical across processes, machines and torch builds with and without CUDA.
    """
    check_rank(rank)
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive, got ({m}, {n})")
    z = torch.empty(m + n, rank, dtype=torch.float32)
    _draw(key, z, torch.Generator(device="cpu"))
    return z[:m], z[m:]


def _draw(key: NoiseKey, out: torch.Tensor, gen: torch.Generator) -> None:
    gen.manual_seed(key.generator_seed())
    torch.randn(out.shape, generator=gen, dtype=torch.float32, out=out)


def stacked_factors(
    seed: int, epoch: int, pairs: range | list[int], layer: int, module: str, m: int, n: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of many pairs for one matrix: A (pairs, m, r) and B (pairs, n, r).

    The same numbers as pair_factors pair by pair, drawn into one preallocated block with one
    reseeded generator: at N = 1024 this halves the time against a fresh generator and a stack.
    """
    check_rank(rank)
    pairs = list(pairs)
    z = torch.empty(len(pairs), m + n, rank, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for i, k in enumerate(pairs):
        _draw(NoiseKey(seed, epoch, k, layer, module), z[i], gen)
    return z[:, :m], z[:, m:]


def noise_epoch(step: int, reuse: int) -> int:
    """Noise reuse: the same pair noise serves `reuse` consecutive steps."""
    if reuse < 1:
        raise ValueError(f"noise reuse must be >= 1 step, got {reuse!r}")
    return step // reuse
