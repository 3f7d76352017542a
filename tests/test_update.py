import math

import pytest
import torch

from adapters import (
    NoiseKey,
    Population,
    Target,
    apply_update,
    matrix_updates,
    member_delta,
    pair_factors,
    shape_fitness,
)

TARGETS = [
    Target(0, "q_proj", 24, 16, "model.layers.0.self_attn.q_proj.weight"),
    Target(0, "down_proj", 16, 40, "model.layers.0.mlp.down_proj.weight"),
    Target(1, "q_proj", 24, 16, "model.layers.1.self_attn.q_proj.weight"),
]


def _dense_reference(pop, seed, epoch, shaped, lr, scaling, target):
    """lr / (norm sigma) * sum_i f_i E_i, every member's E_i written out in float64."""
    norm = pop.size if scaling == "mean" else math.sqrt(pop.size)
    total = torch.zeros(target.out_features, target.in_features, dtype=torch.float64)
    for i in range(pop.size):
        total += float(shaped[i]) * member_delta(pop, i, target, seed, epoch)
    return lr / (norm * pop.sigma) * total


@pytest.mark.parametrize("scaling", ["mean", "sqrt"])
@pytest.mark.parametrize("rank,antithetic", [(1, True), (3, True), (2, False)])
def test_update_equals_dense_sum_of_perturbations(scaling, rank, antithetic):
    pop = Population(size=12, rank=rank, sigma=0.02, antithetic=antithetic)
    shaped = shape_fitness(torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), "centered")
    for target, delta in matrix_updates(TARGETS, pop, 5, 2, shaped, 0.3, scaling):
        ref = _dense_reference(pop, 5, 2, shaped, 0.3, scaling, target)
        assert delta.dtype == torch.float32
        rel = (delta.double() - ref).norm() / ref.norm()
        assert rel < 1e-5, (target, rel)


def test_update_is_high_rank():
    pop = Population(size=40, rank=1, sigma=0.1)
    shaped = torch.randn(40, generator=torch.Generator().manual_seed(0))
    (_, delta), *_ = matrix_updates(TARGETS[:1], pop, 0, 0, shaped, 1.0)
    # 20 pairs of rank 1 give rank min(20, 16) = 16: a full-rank update from rank-1 members.
    assert torch.linalg.matrix_rank(delta.double()) == 16


def test_apply_update_adds_in_place_to_float32_masters():
    pop = Population(size=8, rank=1, sigma=0.05)
    shaped = shape_fitness(torch.arange(8.0), "rank")
    weights = {t.param: torch.randn(t.out_features, t.in_features) for t in TARGETS}
    before = {k: v.clone() for k, v in weights.items()}
    apply_update(weights, TARGETS, pop, 1, 0, shaped, 0.1)
    for t in TARGETS:
        ref = _dense_reference(pop, 1, 0, shaped, 0.1, "mean", t)
        # W + delta - W in float32 is exact only to float32 rounding of W (|W| ~ 3, so ~4e-7).
        torch.testing.assert_close((weights[t.param] - before[t.param]).double(), ref, rtol=1e-4, atol=1e-6)
        assert ref.abs().max() > 1e-3
    with pytest.raises(TypeError, match="float32 masters"):
        apply_update({k: v.half() for k, v in weights.items()}, TARGETS, pop, 1, 0, shaped, 0.1)


def test_all_equal_fitness_gives_zero_update():
    pop = Population(size=6, rank=2, sigma=0.1)
    shaped = shape_fitness(torch.ones(6, 2), "centered")
    for _, delta in matrix_updates(TARGETS, pop, 0, 0, shaped, 1.0):
        assert torch.count_nonzero(delta) == 0


def test_antithetic_members_are_opposite_and_use_their_pair_noise():
    pop = Population(size=4, rank=2, sigma=0.3)
    t = TARGETS[1]
    e0, e1 = member_delta(pop, 0, t, 9, 1), member_delta(pop, 1, t, 9, 1)
    torch.testing.assert_close(e0, -e1)
    a, b = pair_factors(NoiseKey(9, 1, 0, t.layer, t.module), t.out_features, t.in_features, 2)
    torch.testing.assert_close(e0, 0.3 / math.sqrt(2) * (a.double() @ b.double().T))
    assert not torch.allclose(member_delta(pop, 2, t, 9, 1), e0)


def test_noise_reuse_keeps_member_noise_within_an_epoch():
    pop = Population(size=4, rank=1, sigma=0.1)
    t = TARGETS[0]
    assert torch.equal(member_delta(pop, 2, t, 0, epoch=0), member_delta(pop, 2, t, 0, epoch=0))
    assert not torch.equal(member_delta(pop, 2, t, 0, epoch=0), member_delta(pop, 2, t, 0, epoch=1))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(size=7), "population size 7 is odd"),
        (dict(size=0), "population size must be an integer >= 1"),
        (dict(size=4, rank=0), "rank must be an integer >= 1, got 0"),
        (dict(size=4, sigma=0.0), "sigma must be a finite number > 0, got 0.0"),
        (dict(size=4, sigma=-1e-3), "sigma must be a finite number > 0"),
        (dict(size=4, sigma=float("nan")), "sigma must be a finite number > 0, got nan"),
    ],
)
def test_bad_population_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Population(**kwargs)


def test_odd_population_is_fine_without_antithetic_pairs():
    assert Population(size=7, antithetic=False).draws == 7


def test_bad_update_inputs():
    pop = Population(size=4)
    with pytest.raises(ValueError, match="expected 4 shaped fitness values"):
        list(matrix_updates(TARGETS, pop, 0, 0, torch.zeros(3), 0.1))
    with pytest.raises(ValueError, match="NaN or inf"):
        list(matrix_updates(TARGETS, pop, 0, 0, torch.tensor([0.0, float("nan"), 0, 0]), 0.1))
    with pytest.raises(ValueError, match="allowed: mean, sqrt"):
        list(matrix_updates(TARGETS, pop, 0, 0, torch.zeros(4), 0.1, scaling="sum"))
