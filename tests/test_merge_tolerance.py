"""The cross-CPU merge tolerance bounds what different float32 summation orders really do."""

import pytest
import torch

from adapters import Population, Target, apply_update, merge_tolerance, shape_fitness
from adapters.update import update_factors


def _other_order(w, a_cat, b_cat):
    """W + sum_q a_q b_q^T accumulated term by term into W, last term first: elementwise float32
    operations in the order furthest from a blocked GEMM (a machine with another BLAS)."""
    out = w.clone()
    for q in reversed(range(a_cat.shape[1])):
        out = out + a_cat[:, q : q + 1] * b_cat[:, q : q + 1].T
    return out


def test_tolerance_bounds_two_summation_orders_over_many_steps():
    torch.manual_seed(0)
    target = Target(0, "q_proj", 24, 20, "w")
    pop = Population(64, 2, sigma=1e-2)
    w_gemm = {"w": torch.randn(24, 20) * 0.5}
    w_other = w_gemm["w"].clone()
    exact = w_gemm["w"].double()
    tolerance, steps = 0.0, 30
    for step in range(steps):
        shaped = shape_fitness(torch.randn(pop.size), "centered")
        (_, a_cat, b_cat), *_ = update_factors([target], pop, 5, step, shaped, lr=0.05)
        w_other = _other_order(w_other, a_cat, b_cat)
        exact += a_cat.double() @ b_cat.double().T
        apply_update(w_gemm, [target], pop, 5, step, shaped, lr=0.05)
        terms = (a_cat.double().abs() @ b_cat.double().abs().T).max().item()
        weight = max(w_gemm["w"].abs().max().item(), w_other.abs().max().item())
        tolerance += merge_tolerance(weight, terms, a_cat.shape[1])
    gap = (w_gemm["w"] - w_other).abs().max().item()
    assert gap <= tolerance
    # Each replica alone is within half the bound of the float64 sum, and they really do differ.
    for w in (w_gemm["w"], w_other):
        assert (w.double() - exact).abs().max().item() <= tolerance / 2
    assert gap > 0


def test_tolerance_formula_and_bad_input():
    # One step of 63 terms plus W: 2 * 64 u / (1 - 64 u) times the magnitude.
    u = 2.0**-24
    assert merge_tolerance(1.0, 0.5, 63) == pytest.approx(2 * 64 * u / (1 - 64 * u) * 1.5, rel=1e-15)
    assert merge_tolerance(1.0, 0.5, 63, steps=10) == pytest.approx(10 * merge_tolerance(1.0, 0.5, 63))
    with pytest.raises(ValueError, match="terms and steps"):
        merge_tolerance(1.0, 1.0, -1)
