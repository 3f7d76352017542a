"""Reward functions as users write them: TRL style, per sample, async; the result and its failures."""

import asyncio
import math
import time

import pytest
import torch

from adapters import shape_fitness
from rewards import (
    FunctionReward,
    RewardError,
    RewardLoadError,
    batched,
    call_style,
    combine,
    load_reward,
    per_sample,
    score_population,
)

PROMPTS = ["What is 3 + 4?", "What is 2 + 2?"]
COMPLETIONS = [["7", "a long answer of many characters"], ["seven", "4"], ["12345678901234567890", ""]]
COLUMNS = {"answer": ["7", "4"]}


def reward_len(completions, **kwargs):
    # TRL's documented example, written the way a TRL user would.
    return [-abs(20 - len(completion)) for completion in completions]


def test_trl_style_reward_is_used_unchanged():
    result = score_population(reward_len, PROMPTS, COMPLETIONS, COLUMNS)
    expected = [[-abs(20 - len(c)) for c in row] for row in COMPLETIONS]
    assert result.matrix.tolist() == expected
    assert result.matrix.dtype == torch.float64 and result.shape == (3, 2)
    assert result.valid.all()
    assert list(result.per_reward) == ["reward_len"]


def test_columns_arrive_as_keyword_lists_aligned_with_prompts():
    seen = []

    def correct(prompts, completions, answer, **kwargs):
        seen.append((list(prompts), list(answer), sorted(kwargs)))
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    result = score_population(correct, PROMPTS, COMPLETIONS, {**COLUMNS, "level": [1, 2]})
    assert result.matrix.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert seen[0] == (PROMPTS, ["7", "4"], ["level"])
    assert len(seen) == 3  # one call per member


def test_per_sample_functions_detected_by_signature_or_decorator():
    def by_name(completion, answer):
        return float(completion == answer)

    @per_sample
    def decorated(text, **columns):
        return float(len(text) == 1)

    @batched(name="everything")
    def batch_kwargs_only(**kwargs):
        return [1.0] * len(kwargs["completions"])

    assert call_style(by_name) == "sample" and call_style(decorated) == "sample"
    assert call_style(reward_len) == "batch" and call_style(batch_kwargs_only) == "batch"
    result = score_population(by_name, PROMPTS, COMPLETIONS, COLUMNS)
    assert result.matrix.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    # Arguments are passed by name, so a decorated function must still use the conventional names.
    with pytest.raises(RewardError, match=r"needs argument\(s\) text .*columns: answer"):
        score_population(decorated, PROMPTS, COMPLETIONS, COLUMNS)
    assert FunctionReward(batch_kwargs_only).name == "everything"


def test_uncallable_signature_is_refused_at_load_time():
    def two_positional(a, b):
        return [0.0]

    with pytest.raises(RewardLoadError, match="completions"):
        FunctionReward(two_positional)


def test_async_reward_runs_concurrently():
    calls = 8

    async def slow(prompts, completions, **kwargs):
        await asyncio.sleep(0.2)
        return [1.0] * len(completions)

    started = time.perf_counter()
    result = score_population(slow, ["p"], [["c"]] * calls, {})
    elapsed = time.perf_counter() - started
    assert result.matrix.shape == (calls, 1) and result.valid.all()
    assert elapsed < calls * 0.2 / 3, elapsed


def test_async_per_sample_reward_and_concurrency_bound():
    active, peak = 0, 0

    @per_sample
    async def slow(completion, **kwargs):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return float(len(completion))

    reward = FunctionReward(slow, max_concurrency=3)
    result = reward.score(["p", "q"], [["a", "bb"]] * 5, {})
    assert result.matrix.tolist() == [[1.0, 2.0]] * 5
    assert peak == 3


def test_sync_scoring_inside_a_running_event_loop():
    async def inside():
        return score_population(reward_len, PROMPTS, COMPLETIONS, COLUMNS)

    result = asyncio.run(inside())
    assert result.matrix.shape == (3, 2)


def test_none_is_left_out_and_masked_for_shaping():
    def partial(completions, answer, **kwargs):
        return [None if c == "" else float(c == a) for c, a in zip(completions, answer, strict=True)]

    result = score_population(partial, PROMPTS, COMPLETIONS, COLUMNS)
    assert result.valid.tolist() == [[True, True], [True, True], [True, False]]
    assert math.isnan(result.matrix[2, 1].item())
    shaped = shape_fitness(result.matrix, "centered", valid=result.valid)
    assert torch.isfinite(shaped).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_names_reward_member_and_sample(bad):
    def flaky(completions, **kwargs):
        return [bad if c == "4" else 0.0 for c in completions]

    with pytest.raises(RewardError) as info:
        score_population(flaky, PROMPTS, COMPLETIONS, COLUMNS)
    err = info.value
    assert (err.reward, err.member, err.sample) == ("flaky", 1, 1)
    assert "flaky" in str(err) and "member 1" in str(err) and "sample 1" in str(err)


def test_exceptions_and_bad_outputs_become_reward_errors():
    def raises(completion):
        if completion == "seven":
            raise KeyError("boom")
        return 1.0

    with pytest.raises(RewardError) as info:
        score_population(raises, PROMPTS, COMPLETIONS)
    assert (info.value.member, info.value.sample) == (1, 0) and "KeyError" in str(info.value)

    with pytest.raises(RewardError, match="returned 1 rewards for 2 completions"):
        score_population(lambda completions, **kw: [1.0], PROMPTS, COMPLETIONS)
    with pytest.raises(RewardError, match="a reward must be a number"):
        score_population(lambda completions, **kw: ["1.0"] * len(completions), PROMPTS, COMPLETIONS)
    with pytest.raises(RewardError, match="needs argument"):
        score_population(lambda completions, gold: [0.0] * len(completions), PROMPTS, COMPLETIONS, COLUMNS)


def test_combined_rewards_are_weighted_and_logged_separately():
    def sometimes(completions, **kwargs):
        return [None if c == "" else 1.0 for c in completions]

    def never(completions, **kwargs):
        return [None] * len(completions)

    reward = combine(reward_len, sometimes, never, weights=[0.5, 2.0, 1.0])
    result = reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    lengths = torch.tensor([[-abs(20 - len(c)) for c in row] for row in COMPLETIONS], dtype=torch.float64)
    assert set(result.per_reward) == {"reward_len", "sometimes", "never"}
    assert torch.equal(result.per_reward["reward_len"], lengths)
    # A component's None drops out of that sample's sum; only all-None leaves no score.
    assert result.matrix[2, 1].item() == 0.5 * lengths[2, 1].item()
    assert result.matrix[0, 0].item() == 0.5 * lengths[0, 0].item() + 2.0
    assert result.valid.all()
    only_none = combine(never, never).score(PROMPTS, COMPLETIONS)
    assert not only_none.valid.any() and list(only_none.per_reward) == ["never", "never_2"]


def test_load_reward_combines_a_comma_list_with_weights():
    reward = load_reward("numeric, length_penalty", weights=[1.0, 0.5])
    result = reward.score(["q"], [["7"], ["7" + " filler" * 40]], {"answer": ["7"]})
    assert result.per_reward["numeric"].tolist() == [[1.0], [1.0]]
    assert result.matrix[0, 0].item() == 1.0 and result.matrix[1, 0].item() < 1.0
    with pytest.raises(RewardLoadError, match="1 reward weights for 2 rewards"):
        load_reward("numeric,exact", weights=[1.0])


def test_shape_mismatches_are_reported():
    with pytest.raises(ValueError, match="N x P"):
        score_population(reward_len, PROMPTS, ["7", "4"])
    with pytest.raises(ValueError, match="member 1 has 1 completions for 2 prompts"):
        score_population(reward_len, PROMPTS, [["7", "4"], ["7"]])
    with pytest.raises(ValueError, match="column 'answer' has 1 values"):
        score_population(reward_len, PROMPTS, COMPLETIONS, {"answer": ["7"]})
