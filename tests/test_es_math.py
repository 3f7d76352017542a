"""ES with the EGGROLL update: the rank-r estimator's bias falls like 1/r, and ES descends."""

import math

import torch

from adapters import Population, Target, apply_update, lowrank_sum, member_delta, shape_fitness


def _objective(w: torch.Tensor) -> torch.Tensor:
    # Cubic, so the antithetic difference keeps a sigma^3 term whose expectation depends on the
    # fourth moment of the noise entries: 3 for Gaussian noise, 3 + 6/r for rank-r noise.
    return (w**3).sum(dim=(-1, -2)) / 3


def _es_gradient(w, eps, sigma):
    diff = (_objective(w + sigma * eps) - _objective(w - sigma * eps)) / (2 * sigma)
    return (diff[:, None, None] * eps).mean(dim=0)


def test_rank_r_gradient_approaches_full_rank_like_one_over_r():
    m, n, sigma, samples = 3, 3, 1.0, 400_000
    w = torch.linspace(-0.5, 0.5, m * n, dtype=torch.float64).reshape(m, n)
    gen = torch.Generator().manual_seed(0)
    full = _es_gradient(w, torch.randn(samples, m, n, generator=gen, dtype=torch.float64), sigma)
    errors = {}
    for r in (1, 2, 4, 8, 16):
        a = torch.randn(samples, m, r, generator=gen, dtype=torch.float64)
        b = torch.randn(samples, n, r, generator=gen, dtype=torch.float64)
        eps = a @ b.transpose(1, 2) / math.sqrt(r)
        diff = (_objective(w + sigma * eps) - _objective(w - sigma * eps)) / (2 * sigma)
        # The estimate as the product computes it: one low-rank matmul over all samples.
        lowrank = lowrank_sum(a, b, diff, 1 / (samples * math.sqrt(r))).double()
        torch.testing.assert_close(lowrank, _es_gradient(w, eps, sigma), rtol=1e-4, atol=1e-4)
        errors[r] = (lowrank - full).norm().item()
    # Expected bias per entry: 2 sigma^2 / r, so the error norm is about 6 / r for a 3 x 3 matrix.
    ranks = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in zip(ranks, ranks[1:], strict=False)), errors
    slope = (math.log(errors[16]) - math.log(errors[1])) / (math.log(16) - math.log(1))
    assert -1.3 < slope < -0.7, (slope, errors)
    assert abs(errors[1] - 6.0) < 0.6, errors


def test_es_reduces_regression_loss_reproducibly():
    target = Target(0, "down_proj", 6, 10, "layers.0.mlp.down_proj.weight")

    def run(seed):
        gen = torch.Generator().manual_seed(123)
        x = torch.randn(64, 10, generator=gen)
        w_true = torch.randn(6, 10, generator=gen)
        y = x @ w_true.T
        weights = {target.param: torch.zeros(6, 10)}
        pop = Population(size=32, rank=1, sigma=0.1)

        def loss(w):
            return ((x.double() @ w.T - y.double()) ** 2).mean().item()

        start = loss(weights[target.param].double())
        for step in range(150):
            w = weights[target.param].double()
            rewards = [-loss(w + member_delta(pop, i, target, seed, step)) for i in range(pop.size)]
            shaped = shape_fitness(rewards, "centered")
            apply_update(weights, [target], pop, seed, step, shaped, lr=0.1)
        return start, loss(weights[target.param].double()), weights[target.param]

    start, end, w1 = run(seed=5)
    assert end < 0.02 * start, (start, end)
    _, _, w2 = run(seed=5)
    assert torch.equal(w1, w2)
    _, _, w3 = run(seed=6)
    assert not torch.equal(w1, w3)
