"""Seeded low-rank noise: every perturbation is a pure function of a small key.

A member's noise is never stored or sent anywhere; any process that knows the key regenerates the
exact numbers. That is what lets the update travel as seeds plus fitness values.

Noise versions (recorded in every replay line as "noise"):
- 1: torch.randn on a CPU torch.Generator seeded with the key's hash. Its float32 bits depend on
  torch's CPU kernels (the AVX2/AVX-512 and the generic Box-Muller differ), so a run drawn with it
  rebuilds exactly only where torch draws the same bits. Kept so old runs resume, replay and export.
- 2: a counter-based SplitMix64 stream per key and an exact-operation ziggurat (adapters/normal.py):
  the same float32 bits on every IEEE-754 machine. Everything new draws this (NOISE_VERSION).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import normal

NOISE_VERSION = 2
NOISE_VERSIONS = {
    1: "torch.randn on a CPU generator (bits depend on torch's CPU kernels)",
    2: "SplitMix64 counters and an exact-operation ziggurat (the same bits on every machine)",
}


def check_noise_version(version) -> int:
    if isinstance(version, bool) or version not in NOISE_VERSIONS:
        known = ", ".join(f"{v} ({d})" for v, d in NOISE_VERSIONS.items())
        raise ValueError(f"unknown noise version {version!r}; this es-serve draws versions {known}")
    return version


@dataclass(frozen=True)
class NoiseKey:
    """Identifies one Gaussian draw Z of shape (m + n, r) for one matrix of one antithetic pair."""

    seed: int
    epoch: int
    pair: int
    layer: int
    module: str

    def _text(self) -> str:
        # A cryptographic hash rather than arithmetic on the fields: seed + layer style mixing gives
        # colliding or correlated streams for neighbouring keys (pair 1 layer 0 vs pair 0 layer 1).
        return f"eggroll/{self.seed}/{self.epoch}/{self.pair}/{self.layer}/{self.module}"

    def generator_seed(self) -> int:
        """The torch.Generator seed of noise version 1."""
        digest = hashlib.blake2b(self._text().encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)

    def stream_start(self) -> int:
        """The 64-bit counter start of noise version 2 (another hash than version 1's seed)."""
        return normal.stream_start(self._text() + "/v2")


def check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def _check_shape(m: int, n: int) -> None:
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive, got ({m}, {n})")


def pair_factors(
    key: NoiseKey, m: int, n: int, rank: int, noise: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m x r) and B (n x r) for one pair and one matrix, float32, on the CPU.

    Drawn on the CPU whatever the target device: noise version 2 is the same there on every machine.
    """
    return many_factors([key], [(m, n)], rank, noise)[0]


def draw_block(
    keys: Sequence[NoiseKey],
    shapes: Sequence[tuple[int, int]],
    rank: int,
    noise: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every key's draw Z (m + n, r), flattened and laid one after another in one float32 tensor.

    Key k's Z starts where the (m + n) r numbers of the keys before it end; `many_factors` cuts it.
    Callers that lay many draws out together (a population, for vLLM's slots) slice it themselves.
    `out`, a contiguous float32 CPU tensor of at least that many numbers, is filled from its start
    and its head returned: a caller drawing every generation reuses one block instead of faulting
    fresh pages in each time (tens of MB at rank 4; the faults of two drawing threads contend).
    """
    check_rank(rank)
    version = check_noise_version(NOISE_VERSION if noise is None else noise)
    if len(keys) != len(shapes):
        raise ValueError(f"{len(keys)} noise keys but {len(shapes)} matrix shapes")
    for m, n in shapes:
        _check_shape(m, n)
    lengths = [(m + n) * rank for m, n in shapes]
    total = sum(lengths)
    if out is None:
        # torch allocates (64-byte aligned) and numpy fills: BLAS kernels pick their code path, and so
        # their summation order, partly by the operands' alignment, which numpy's allocator does not fix.
        out = torch.empty(total, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < total:
        raise ValueError(
            f"draw_block's out must be a contiguous float32 CPU tensor of at least {total} numbers, got "
            f"{out.dtype} on {out.device} with {out.numel()} numbers (contiguous: {out.is_contiguous()})"
        )
    flat = out.view(-1)[:total].numpy()
    if version == 1:
        gen = torch.Generator(device="cpu")
        offset = 0
        for key, length in zip(keys, lengths, strict=True):
            _draw_v1(key, torch.from_numpy(flat[offset : offset + length]), gen)
            offset += length
    else:
        normal.fill([k.stream_start() for k in keys], lengths, flat)
    return torch.from_numpy(flat)


def many_factors(
    keys: Sequence[NoiseKey], shapes: Sequence[tuple[int, int]], rank: int, noise: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """pair_factors of many keys (e.g. every matrix of one member) in one pass."""
    block, out, offset = draw_block(keys, shapes, rank, noise), [], 0
    for m, n in shapes:
        t = block[offset : offset + (m + n) * rank].view(m + n, rank)
        out.append((t[:m], t[m:]))
        offset += (m + n) * rank
    return out


def _draw_v1(key: NoiseKey, out: torch.Tensor, gen: torch.Generator) -> None:
    gen.manual_seed(key.generator_seed())
    torch.randn(out.shape, generator=gen, dtype=torch.float32, out=out)


def stacked_factors(
    seed: int,
    epoch: int,
    pairs: range | list[int],
    layer: int,
    module: str,
    m: int,
    n: int,
    rank: int,
    noise: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of many pairs for one matrix: A (pairs, m, r) and B (pairs, n, r).

    The same numbers as pair_factors pair by pair, drawn into one preallocated block in one pass.
    """
    check_rank(rank)
    _check_shape(m, n)
    version = check_noise_version(NOISE_VERSION if noise is None else noise)
    pairs = list(pairs)
    keys = [NoiseKey(seed, epoch, k, layer, module) for k in pairs]
    z = torch.empty(len(pairs), (m + n) * rank, dtype=torch.float32).numpy()  # aligned, as in many_factors
    if version == 1:
        gen = torch.Generator(device="cpu")
        for i, key in enumerate(keys):
            _draw_v1(key, torch.from_numpy(z[i]), gen)
    else:
        normal.fill([k.stream_start() for k in keys], [z.shape[1]] * len(keys), z)
    t = torch.from_numpy(z).view(len(pairs), m + n, rank)
    return t[:, :m], t[:, m:]


def noise_epoch(step: int, reuse: int) -> int:
    """Noise reuse: the same pair noise serves `reuse` consecutive steps."""
    if reuse < 1:
        raise ValueError(f"noise reuse must be >= 1 step, got {reuse!r}")
    return step // reuse
