"""Momentum and Adam on the ES gradient, against torch.optim fed the ES gradient computed in float64.

The reference gradient comes from the EGGROLL definition alone: every member's perturbation
E_i = s_i (sigma / sqrt r) A_i B_i^T written out in float64 from the noise factors, and
g = 1 / (N sigma) sum_i f_i E_i (the update of plain ES at lr = 1). ES ascends the fitness, so
torch.optim, which descends, is given -g.
"""

import math

import pytest
import torch

from adapters import (
    NoiseKey,
    Optimizer,
    OptimizerState,
    Population,
    Target,
    apply_update,
    pair_factors,
    shape_fitness,
    split_state,
)
from adapters.schedule import scheduled

TARGETS = [
    Target(0, "q_proj", 24, 16, "model.layers.0.self_attn.q_proj.weight"),
    Target(0, "down_proj", 16, 40, "model.layers.0.mlp.down_proj.weight"),
    Target(1, "q_proj", 24, 16, "model.layers.1.self_attn.q_proj.weight"),
]
POP = Population(size=8, rank=2, sigma=0.02, antithetic=True)
SEED = 3
# (noise epoch, learning rate) per step: the second step reuses the first's noise, the lr changes.
STEPS = [(0, 0.01), (0, 0.02), (1, 0.005), (2, 0.01)]


def _es_gradient(pop, seed, epoch, shaped, target, scaling="mean"):
    """1 / (norm sigma) sum_i f_i E_i in float64, E_i from the noise factors."""
    norm = pop.size if scaling == "mean" else math.sqrt(pop.size)
    g = torch.zeros(target.out_features, target.in_features, dtype=torch.float64)
    for i in range(pop.size):
        pair, sign = (i // 2, -1.0 if i % 2 else 1.0) if pop.antithetic else (i, 1.0)
        a, b = pair_factors(
            NoiseKey(seed, epoch, pair, target.layer, target.module), target.out_features, target.in_features, pop.rank
        )
        e = (sign * pop.sigma / math.sqrt(pop.rank)) * (a.double() @ b.double().T)
        g += float(shaped[i]) * e
    return g / (norm * pop.sigma)


def _fitness(step):
    rewards = torch.randn(POP.size, 3, generator=torch.Generator().manual_seed(100 + step))
    return shape_fitness(rewards, "centered")


def _masters():
    gen = torch.Generator().manual_seed(7)
    return {t.param: 0.05 * torch.randn(t.out_features, t.in_features, generator=gen) for t in TARGETS}


def _reference(make_optimizer, scaling="mean"):
    """Each target's weights after STEPS under a torch.optim optimizer in float64."""
    params = {name: torch.nn.Parameter(w.double().clone()) for name, w in _masters().items()}
    opt = make_optimizer(list(params.values()))
    for step, (epoch, lr) in enumerate(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr
        shaped = _fitness(step)
        for t in TARGETS:
            params[t.param].grad = -_es_gradient(POP, SEED, epoch, shaped, t, scaling)
        opt.step()
    return {name: p.detach() for name, p in params.items()}


def _ours(optimizer, scaling="mean"):
    weights, state = _masters(), OptimizerState(optimizer.name)
    for step, (epoch, lr) in enumerate(STEPS):
        apply_update(weights, TARGETS, POP, SEED, epoch, _fitness(step), lr, scaling, optimizer=optimizer, state=state)
    return weights, state


def _assert_close_steps(ours, ref, scale):
    """The float32 result against float64 torch.optim, judged on the change each made to the weights."""
    base = _masters()
    for name, w in ours.items():
        assert w.dtype == torch.float32
        moved_ours = w.double() - base[name].double()
        moved_ref = ref[name] - base[name].double()
        assert moved_ref.abs().max() > 10 * scale * 1e-3, "the reference must move the weights"
        torch.testing.assert_close(moved_ours, moved_ref, rtol=2e-4, atol=scale * 1e-4)


@pytest.mark.parametrize("scaling", ["mean", "sqrt"])
def test_momentum_equals_torch_sgd_with_momentum_on_the_es_gradient(scaling):
    ours, state = _ours(Optimizer("momentum", momentum=0.8), scaling)
    ref = _reference(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8), scaling)
    # The momentum buffers pile up about lr / (1 - mu) per unit of gradient.
    _assert_close_steps(ours, ref, scale=0.05)
    assert state.step == len(STEPS)
    assert {k for held in state.buffers.values() for k in held} == {"momentum_buffer"}


@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.5, 0.9), 1e-3)])
def test_adam_equals_torch_adam_on_the_es_gradient(betas, eps):
    ours, state = _ours(Optimizer("adam", beta1=betas[0], beta2=betas[1], eps=eps))
    ref = _reference(lambda p: torch.optim.Adam(p, lr=0.01, betas=betas, eps=eps))
    # Adam moves each weight by about lr per step whatever the gradient's size.
    _assert_close_steps(ours, ref, scale=0.02)
    assert state.step == len(STEPS)
    for name, held in state.buffers.items():
        assert held["exp_avg"].dtype == held["exp_avg_sq"].dtype == torch.float32
        assert held["exp_avg"].shape == _masters()[name].shape


def test_sgd_is_the_plain_merge_bit_for_bit():
    plain, routed = _masters(), _masters()
    for step, (epoch, lr) in enumerate(STEPS):
        apply_update(plain, TARGETS, POP, SEED, epoch, _fitness(step), lr)
        apply_update(routed, TARGETS, POP, SEED, epoch, _fitness(step), lr, optimizer=Optimizer("sgd"))
    for name in plain:
        assert torch.equal(plain[name], routed[name]), name


def test_all_equal_fitness_still_steps_momentum_and_adam_like_torch_with_zero_gradient():
    # A step without signal is a zero gradient, not a skipped step: the velocity still carries on.
    weights, state = _masters(), OptimizerState("momentum")
    rule = Optimizer("momentum", momentum=0.5)
    apply_update(weights, TARGETS, POP, SEED, 0, _fitness(0), 0.01, optimizer=rule, state=state)
    after_one = {k: v.clone() for k, v in weights.items()}
    apply_update(weights, TARGETS, POP, SEED, 1, torch.zeros(POP.size), 0.01, optimizer=rule, state=state)
    first = {k: after_one[k] - _masters()[k] for k in weights}
    for name, w in weights.items():
        torch.testing.assert_close(w - after_one[name], 0.5 * first[name], rtol=1e-5, atol=1e-8)
    assert state.step == 2


def test_state_round_trips_through_flat_tensors_and_refuses_another_rule():
    _, state = _ours(Optimizer("adam"))
    flat = state.tensors()
    assert all(k.startswith("optimizer/adam/") for k in flat)
    weights, back = split_state({**_masters(), **flat})
    assert set(weights) == {t.param for t in TARGETS}
    assert back.step == state.step and back.buffers.keys() == state.buffers.keys()
    for name, held in state.buffers.items():
        for kind, t in held.items():
            assert torch.equal(back.buffers[name][kind], t)
    assert split_state(_masters())[1] is None  # a checkpoint from before optimizers: no state
    with pytest.raises(ValueError, match="kept for adam but this step uses momentum"):
        apply_update(_masters(), TARGETS, POP, SEED, 0, _fitness(0), 0.01, optimizer=Optimizer("momentum"), state=back)
    with pytest.raises(ValueError, match="keeps state: pass its OptimizerState"):
        apply_update(_masters(), TARGETS, POP, SEED, 0, _fitness(0), 0.01, optimizer=Optimizer("adam"))
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        Optimizer("lion")
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        Optimizer("adam", beta2=1.0)


def test_schedules_by_hand():
    # cosine, T = 5, one warmup step, down to 0.1: p = (t - 2) / 3 after warmup.
    cosine = [scheduled(1.0, "cosine", t, 5, 0.1, 1) for t in range(1, 7)]
    expected = [1.0, 1.0, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25, 0.1, 0.1]  # (1 + cos(pi/3)) / 2 = 0.75
    assert cosine == pytest.approx(expected, abs=1e-12)
    assert [scheduled(2.0, "linear", t, 5, 0.2) for t in range(1, 6)] == pytest.approx([2.0, 1.6, 1.2, 0.8, 0.4])
    assert [scheduled(2.0, "constant", t, 8, 0.0, 4) for t in range(1, 7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [scheduled(3e-3, "constant", t, 40) for t in (1, 40)] == [3e-3, 3e-3]  # exactly es.lr, as before
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        scheduled(1.0, "step", 1, 5)
