"""The ES update: the fitness-weighted sum of low-rank perturbations, one matmul per matrix.

For antithetic pairs with c_k = f_{2k} - f_{2k+1}:
    delta W = lr / (N sigma) * sum_k c_k E_k = lr / (N sqrt r) * A diag(c) B^T
with A = [A_1 .. A_K] (m x Kr) and B = [B_1 .. B_K] (n x Kr). The sum of K rank-r terms is rank Kr,
so the update is as expressive as full-rank ES while nothing larger than one m x n delta exists.

What is bitwise the same across machines, and what is not:
- The factors A_k, B_k are (noise version 2, adapters/normal.py), and so are the coefficients c and
  the scaled A diag(c) factor: elementwise float32 products, correctly rounded on any IEEE machine.
- The merge W += A diag(c) B^T is a float32 GEMM (addmm_). BLAS libraries block and vectorise the
  K r-term dot products differently on different CPU kinds (AVX2 vs AVX-512 vs ARM kernels, with or
  without FMA), so replicas on different CPUs can end a merge a few ulp apart. On one CPU kind with
  one library and thread count the result is deterministic, which the bitwise checksum relies on.

Tolerance between replicas on different CPU kinds (merge_tolerance): per element, any summation
order of the n + 1 = K r + 1 terms W_ij + sum_q t_ijq (with or without FMA) is within
gamma_{n+1} (|W_ij| + sum_q |t_ijq|) of the exact sum, gamma_k = k u / (1 - k u), u = 2^-24
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4). Two replicas fed the same
inputs differ by at most twice that. Later steps add the same deltas (the factors and c do not
depend on W), and the exact sum is linear in W, so a difference carries over unamplified and the
bounds add up: after S steps
    max |W1 - W2| <= sum over steps of 2 gamma_{Kr+1} (max |W| + max_ij sum_q |t_ijq|),
where sum_q |t_ijq| <= |lr / (N sqrt r)| sum_k |c_k| max|A_k| max|B_k|. This is a worst case (every
rounding one way); typical differences are about sqrt(S) ulp(W). A skipped or repeated step moves W by
the whole delta, orders of magnitude more for any learning rate that trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping, Sequence

import torch

from .noise import stacked_factors
from .optim import Optimizer, OptimizerState, begin_step, step_matrix
from .population import Population
from .targets import Target

# (target, draws) -> the draws' stacks A (K, m, r) and B (K, n, r) if the caller holds them, else None.
DrawnFactors = Callable[[Target, list[int]], "tuple[torch.Tensor, torch.Tensor] | None"]

SCALINGS = ("mean", "sqrt")


def merge_tolerance(weight_abs_max: float, term_abs_sum: float, terms: int, steps: int = 1) -> float:
    """Largest |W1 - W2| of two correct float32 replicas with different BLAS summation orders.

    weight_abs_max: max |W| over the steps; term_abs_sum: a bound on sum_q |t_ijq| of one step's
    GEMM terms; terms: K r (active pairs times rank); steps: merges since the replicas last agreed.
    """
    if terms < 0 or steps < 0:
        raise ValueError(f"terms and steps must be >= 0, got {terms} and {steps}")
    ku = (terms + 1) * 2.0**-24
    return steps * 2 * ku / (1 - ku) * (weight_abs_max + term_abs_sum)


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
    weights = (coeffs.to(torch.float32) * factor).view(1, k, 1).to(a.device)
    # Scaled on the way from (K, m, r) to (m, K, r): one pass over A instead of a copy and a product.
    a_cat = torch.empty(m, k, r, dtype=torch.float32, device=a.device)
    torch.mul(a.to(torch.float32).permute(1, 0, 2), weights, out=a_cat)
    b_cat = b.to(torch.float32).permute(1, 0, 2).reshape(n, k * r)
    return a_cat.view(m, k * r), b_cat


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
    noise: int | None = None,
    drawn: DrawnFactors | None = None,
) -> Iterator[tuple[Target, torch.Tensor | None, torch.Tensor | None]]:
    """(target, A diag(c) factor, B) per target, so delta W = first @ second^T; (target, None, None)
    when every coefficient is zero (all-equal fitness).

    `drawn(target, draws)`, if given, returns the stacks A (K, m, r), B (K, n, r) of those draws when
    the caller still holds them from serving the members (the same numbers stacked_factors would
    draw), or None; this saves drawing the population's noise a second time at every merge.
    """
    coeffs = draw_coefficients(pop, shaped_fitness)
    factor = update_factor(pop, lr, scaling)
    active = [k for k in range(coeffs.numel()) if coeffs[k] != 0]
    for target in targets:
        if not active:
            yield target, None, None
            continue
        held = drawn(target, active) if drawn is not None else None
        if held is not None:
            a, b = held
        else:
            a, b = stacked_factors(
                seed, epoch, active, target.layer, target.module, target.out_features, target.in_features, pop.rank,
                noise,
            )  # fmt: skip
        yield target, *_factors(a, b, coeffs[active], factor)


def matrix_updates(
    targets, pop, seed, epoch, shaped_fitness, lr, scaling="mean", noise=None
) -> Iterator[tuple[Target, torch.Tensor]]:
    """(target, delta W) for every target, one at a time so only one m x n delta is ever alive."""
    for target, a_cat, b_cat in update_factors(targets, pop, seed, epoch, shaped_fitness, lr, scaling, noise):
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
    noise: int | None = None,
    optimizer: Optimizer | None = None,
    state: OptimizerState | None = None,
    drawn: DrawnFactors | None = None,
) -> None:
    """Adds delta W to each float32 master weight in place (weights keyed by parameter name).

    addmm_ accumulates straight into the master, so no m x n delta is ever allocated. noise is the
    noise version to redraw (default adapters.noise.NOISE_VERSION; a replay passes its step's own).
    With a stateful optimizer (momentum, adam; see optim.py) the ES gradient of each matrix is formed
    (one m x n temporary at a time) and stepped with `state`, which is updated in place.
    """
    for target in targets:
        w = weights[target.param]
        if w.dtype != torch.float32:
            raise TypeError(
                f"master weight {target.param} is {w.dtype}; keep float32 masters so small ES steps "
                "are not rounded away"
            )
    if optimizer is not None and optimizer.stateful:
        if state is None:
            raise ValueError(f"optimizer {optimizer.name} keeps state: pass its OptimizerState")
        if not math.isfinite(lr):
            raise ValueError(f"learning rate must be finite, got {lr!r}")
        begin_step(optimizer, state)
        # The gradient is the update at lr = 1; the rule applies the step's lr itself.
        for target, a_cat, b_cat in update_factors(
            targets, pop, seed, epoch, shaped_fitness, 1.0, scaling, noise, drawn
        ):
            w = weights[target.param]
            grad = torch.zeros_like(w) if a_cat is None else (a_cat @ b_cat.T).to(w.device)
            step_matrix(w, grad, state.for_param(target.param, w), optimizer, lr, state.step)
        return
    for target, a_cat, b_cat in update_factors(targets, pop, seed, epoch, shaped_fitness, lr, scaling, noise, drawn):
        if a_cat is not None:
            w = weights[target.param]
            w.addmm_(a_cat.to(w.device), b_cat.T.to(w.device))
