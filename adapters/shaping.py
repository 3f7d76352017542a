"""Fitness shaping: an N x P reward matrix becomes one number per member.

Missing scores (a reward that said "no score") are NaN in a float matrix together with a mask; a
NaN or inf that the mask does not excuse is an error, never silently averaged away.
"""

from __future__ import annotations

import torch

SHAPINGS = ("centered", "centered_raw", "zscore", "rank")


def shape_fitness(rewards, method: str = "centered", population: int | None = None, valid=None) -> torch.Tensor:
    """Shaped fitness, float64 tensor of length N.

    rewards: N x P (member x prompt) or length N. valid: optional boolean mask of the same shape;
    invalid entries are left out of every mean. All-equal fitness gives zeros.
    """
    if method not in SHAPINGS:
        raise ValueError(f"unknown fitness shaping {method!r}; allowed: {', '.join(SHAPINGS)}")
    f = torch.as_tensor(rewards, dtype=torch.float64)
    if f.dim() == 1:
        f = f[:, None]
    if f.dim() != 2:
        raise ValueError(f"fitness must be N or N x P (member x prompt), got shape {tuple(f.shape)}")
    if population is not None and f.shape[0] != population:
        raise ValueError(
            f"fitness has {f.shape[0]} rows but the population has {population} members: pass one row per member"
        )
    mask = torch.ones_like(f, dtype=torch.bool) if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    if mask.shape != f.shape:
        raise ValueError(f"valid mask has shape {tuple(mask.shape)}, fitness has {tuple(f.shape)}")
    bad = ~torch.isfinite(f) & mask
    if bad.any():
        i, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"fitness of member {i} on prompt {p} is {f[i, p].item()}: rewards must be finite "
            "numbers (return None for 'no score')"
        )
    f = torch.where(mask, f, torch.zeros_like(f))
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        i = int((counts == 0).nonzero()[0])
        raise ValueError(f"member {i} has no valid reward on any prompt: nothing to shape")
    if method == "centered":
        return _centered(f, mask)
    if method == "centered_raw":
        out = _prompt_centered(f, mask)
        # Rounding noise of an all-equal matrix is no signal (Adam would scale it up to a full step).
        return torch.zeros_like(out) if out.abs().max() <= 1e-12 * max(1.0, float(f.abs().max())) else out
    per_member = f.sum(dim=1) / counts
    if method == "zscore":
        centered = per_member - per_member.mean()
        return centered / torch.sqrt(centered.var(unbiased=False) + 1e-5)
    return _centered_ranks(per_member)


def _prompt_centered(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Subtracting each prompt's mean first removes prompt difficulty from the comparison.
    per_prompt = f.sum(dim=0) / mask.sum(dim=0).clamp(min=1)
    diff = torch.where(mask, f - per_prompt, torch.zeros_like(f))
    return diff.sum(dim=1) / mask.sum(dim=1)


def _centered(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Scaled to unit spread, every step moves about as far; centered_raw keeps the reward's own scale,
    # so a step where a single outcome differed moves little.
    out = _prompt_centered(f, mask)
    std = out.std(unbiased=False)
    # A relative threshold: rounding noise in an all-equal matrix must not be blown up to +-1.
    if std <= 1e-12 * max(1.0, float(f.abs().max())):
        return torch.zeros_like(out)
    return out / std


def _centered_ranks(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    if n == 1:
        return torch.zeros_like(x)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(n, dtype=x.dtype)
    # Ties share the average of their ranks, so equal rewards get equal weight.
    for value in torch.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks / (n - 1) - 0.5
