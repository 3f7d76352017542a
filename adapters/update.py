"""The ES update: the fitness-weighted sum of low-rank perturbations, one matmul per matrix.

For antithetic pairs with c_k = f_{2k} - f_{2k+1}:
    delta W = lr / (N sigma) * sum_k c_k E_k = lr / (N sqrt r) * A diag(c) B^T
with A = [A_1 .. A_K] (m x Kr) and B = [B_1 .. B_K] (n x Kr). The sum of K rank-r terms is rank Kr,
so the update is as expressive as full-rank ES while nothing larger than one m x n delta exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping, Sequence

import torch

from .noise import stacked_factors
from .population import Population
from .targets import Target

SCALINGS = ("mean", "sqrt")


def draw_coefficients(pop: Population, shaped_fitness) -> torch.Tensor:
    """One coefficient per noise draw: the antithetic difference, or the fitness itself."""
    f = torch.as_tensor(shaped_fitness, dtype=torch.float64).reshape(-1)
    if f.numel() != pop.size:
        raise ValueError(f"expected {pop.size} shaped fitness values (one per member), got {f.numel()}")
    if not torch.isfinite(f).all():
        raise ValueError("shaped fitness contains NaN or inf; shape the rewards with shape_fitness first")
    return f[0::2] - f[1::2] if pop.antithetic else f


def update_factor(pop: Population, lr: float, scaling: str = "mean") -> float:
    """The scalar in front of A diag(c) B^T.

    'mean' divides by N as in EGGROLL's estimator; 'sqrt' divides by sqrt(N) as the official JAX code
    does, which keeps the step size from shrinking as the population grows.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown update scaling {scaling!r}; allowed: {', '.join(SCALINGS)}")
    if not math.isfinite(lr):
        raise ValueError(f"learning rate must be finite, got {lr!r}")
    norm = pop.size if scaling == "mean" else math.sqrt(pop.size)
    return lr / (norm * math.sqrt(pop.rank))


def _factors(a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor, factor: float):
    """A diag(c) (m x Kr) and B (n x Kr) for stacks A (K, m, r), B (K, n, r)."""
    k, m, r = a.shape
    n = b.shape[1]
    weights = coeffs.to(torch.float32).repeat_interleave(r)
    a_cat = a.to(torch.float32).permute(1, 0, 2).reshape(m, k * r) * (weights * factor)
    b_cat = b.to(torch.float32).permute(1, 0, 2).reshape(n, k * r)
    return a_cat, b_cat


def lowrank_sum(a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * sum_k coeffs[k] A_k B_k^T for stacks A (K, m, r), B (K, n, r), in float32."""
    a_cat, b_cat = _factors(a, b, coeffs, factor)
    return a_cat @ b_cat.T


def update_factors(
    targets: Sequence[Target],
    pop: Population,
    seed: int,
    epoch: int,
    shaped_fitness,
    lr: float,
    scaling: str = "mean",
) -> Iterator[tuple[Target, torch.Tensor | None, torch.Tensor | None]]:
    """(target, A diag(c) factor, B) per target, so delta W = first @ second^T; (target, None, None)
    when every coefficient is zero (all-equal fitness)."""
    coeffs = draw_coefficients(pop, shaped_fitness)
    factor = update_factor(pop, lr, scaling)
    active = [k for k in range(coeffs.numel()) if coeffs[k] != 0]
    for target in targets:
        if not active:
            yield target, None, None
            continue
        a, b = stacked_factors(
            seed, epoch, active, target.layer, target.module, target.out_features, target.in_features, pop.rank
        )
        yield target, *_factors(a, b, coeffs[active], factor)


def matrix_updates(
    targets, pop, seed, epoch, shaped_fitness, lr, scaling="mean"
) -> Iterator[tuple[Target, torch.Tensor]]:
    """(target, delta W) for every target, one at a time so only one m x n delta is ever alive."""
    for target, a_cat, b_cat in update_factors(targets, pop, seed, epoch, shaped_fitness, lr, scaling):
        if a_cat is None:
            yield target, torch.zeros(target.out_features, target.in_features)
        else:
            yield target, a_cat @ b_cat.T


def apply_update(
    weights: MutableMapping[str, torch.Tensor],
    targets: Sequence[Target],
    pop: Population,
    seed: int,
    epoch: int,
    shaped_fitness,
    lr: float,
    scaling: str = "mean",
) -> None:
    """Adds delta W to each float32 master weight in place (weights keyed by parameter name).

    addmm_ accumulates straight into the master, so no m x n delta is ever allocated.
    """
    for target in targets:
        w = weights[target.param]
        if w.dtype != torch.float32:
            raise TypeError(
                f"master weight {target.param} is {w.dtype}; keep float32 masters so small ES steps "
                "are not rounded away"
            )
    for target, a_cat, b_cat in update_factors(targets, pop, seed, epoch, shaped_fitness, lr, scaling):
        if a_cat is not None:
            w = weights[target.param]
            w.addmm_(a_cat.to(w.device), b_cat.T.to(w.device))
