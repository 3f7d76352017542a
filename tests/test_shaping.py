import numpy as np
import pytest
import torch

from adapters import shape_fitness


def _ref_centered(F):
    F = np.asarray(F, dtype=np.float64)
    f = (F - F.mean(axis=0, keepdims=True)).mean(axis=1)
    s = f.std()
    return f / s if s > 0 else f * 0


def _ref_rank(f):
    f = np.asarray(f, dtype=np.float64)
    n = len(f)
    ranks = np.empty(n)
    for i, v in enumerate(f):
        less, equal = (f < v).sum(), (f == v).sum()
        ranks[i] = less + (equal - 1) / 2
    return ranks / (n - 1) - 0.5


def test_centered_matches_reference():
    F = np.random.default_rng(0).normal(size=(8, 5))
    np.testing.assert_allclose(shape_fitness(F, "centered").numpy(), _ref_centered(F), rtol=1e-12)


def test_zscore_matches_reference():
    F = np.random.default_rng(1).normal(size=(6, 3))
    f = F.mean(axis=1)
    ref = (f - f.mean()) / np.sqrt(f.var() + 1e-5)
    np.testing.assert_allclose(shape_fitness(F, "zscore").numpy(), ref, rtol=1e-12)


def test_rank_with_ties_averaged():
    f = [3.0, 1.0, 3.0, 0.0, 2.0, 3.0]
    out = shape_fitness(f, "rank").numpy()
    np.testing.assert_allclose(out, _ref_rank(f))
    assert out[0] == out[2] == out[5]
    assert out.min() == -0.5


@pytest.mark.parametrize("method", ["centered", "centered_raw", "zscore", "rank"])
def test_all_equal_fitness_gives_zero(method):
    out = shape_fitness(torch.full((6, 4), 0.7), method)
    assert torch.count_nonzero(out) == 0


def test_missing_scores_are_left_out_of_the_means():
    F = np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    valid = ~np.isnan(F)
    out = shape_fitness(F, "centered", valid=valid).numpy()
    # Prompt means over valid entries only: [0.5, 2/3].
    raw = np.array([0.5, (-0.5 + 1 / 3) / 2, (0.5 + 1 / 3) / 2, (-0.5 - 2 / 3) / 2])
    np.testing.assert_allclose(out, raw / raw.std(), rtol=1e-12)


def test_nan_fitness_is_an_error_naming_member_and_prompt():
    F = np.zeros((4, 2))
    F[2, 1] = np.nan
    with pytest.raises(ValueError, match="member 2 on prompt 1 is nan"):
        shape_fitness(F, "centered")
    F[2, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        shape_fitness(F, "rank")


def test_wrong_shape_and_unknown_method():
    with pytest.raises(ValueError, match="4 rows but the population has 6"):
        shape_fitness(np.zeros((4, 2)), "centered", population=6)
    with pytest.raises(ValueError, match="N or N x P"):
        shape_fitness(np.zeros((2, 2, 2)), "centered")
    with pytest.raises(ValueError, match="allowed: centered, centered_raw, zscore, rank"):
        shape_fitness(np.zeros(4), "softmax")


def test_centered_raw_is_eggroll_vllms_per_prompt_centering_without_the_std_division():
    # Members x prompts; prompt means 0.5 and 0.5; each member's mean of its centered rewards, by hand.
    F = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    np.testing.assert_allclose(shape_fitness(F, "centered_raw").numpy(), [0.0, -0.5, 0.5, 0.0], rtol=0, atol=1e-15)
    # Rewards on a scale of 10 give 10x the values: the reward's own scale is kept.
    np.testing.assert_allclose(shape_fitness(np.array(F) * 10, "centered_raw").numpy(), [0, -5, 5, 0], atol=1e-14)
    # Member 1 unscored on prompt 1: that prompt's mean is over members 0, 2, 3 (2/3).
    F2 = np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0], [0.0, 1.0]])
    out = shape_fitness(F2, "centered_raw", valid=~np.isnan(F2)).numpy()
    np.testing.assert_allclose(out, [-1 / 12, -0.5, 5 / 12, -1 / 12], rtol=1e-12)
    # eggroll-vllm's --normalize-with-std divides by the std of these values: es-serve's "centered".
    np.testing.assert_allclose(shape_fitness(F2, "centered", valid=~np.isnan(F2)).numpy(), out / out.std(), rtol=1e-12)
