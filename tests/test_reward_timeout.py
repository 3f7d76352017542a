"""reward.timeout_s: a reward that hangs fails the step before any weight changes, and loses nothing."""

import asyncio
import threading
import time

import pytest
import torch
from fakes import CountReward, Task

from es_serve.config import load_config
from es_serve.engines.dense import DenseEngine
from es_serve.export import trained_weights
from es_serve.run_dir import RunDir
from es_serve.trainer import Trainer
from rewards import load_reward
from rewards.aio import RewardTimeout, call_with_timeout
from rewards.scoring import as_reward


class HangingReward(CountReward):
    """Scores like CountReward, but its `hang_on_call`-th call blocks until released."""

    def __init__(self, hang_on_call):
        super().__init__()
        self.hang_on_call, self.release = hang_on_call, threading.Event()

    def score(self, *args, **kwargs):
        if self.calls + 1 == self.hang_on_call:
            self.calls += 1
            self.release.wait(120)
            raise RuntimeError("released")
        return super().score(*args, **kwargs)


def _config(*extra):
    sets = [
        "model.name=tiny",
        "es.population=4",
        "es.sigma=0.2",
        "task.prompts_per_step=2",
        "task.eval_prompts=2",
        "generation.max_tokens=4",
        "train.steps=3",
        "train.eval_every=100",
        "train.checkpoint_every=100",
        "engine.kind=dense",
        "reward.timeout_s=2",
    ]
    return load_config(None, sets + list(extra))


def test_a_hanging_reward_fails_the_step_with_nothing_merged_and_nothing_lost(tiny_model_dir, tmp_path):
    reward = HangingReward(hang_on_call=3)  # calls: eval at step 0, step 1, step 2 (hangs)
    engine = DenseEngine(tiny_model_dir, dtype=torch.float32)
    trainer = Trainer(_config(), tmp_path / "run", engine, Task(), reward)
    try:
        with pytest.raises(RewardTimeout, match="reward.timeout_s"):
            trainer.train()
    finally:
        reward.release.set()
    run = RunDir(tmp_path / "run")
    assert run.committed_step() == 1 and [m["step"] for m in run.metrics()] == [0, 1]
    # The engine holds exactly step 1's weights, as rebuilt from the base model and the replay log.
    step, rebuilt = trained_weights(run, tiny_model_dir, _config().es.modules)
    assert step == 1
    for name, w in engine.state_dict().items():
        assert torch.equal(rebuilt[name], w), name
    resumed = Trainer(_config(), tmp_path / "run", engine, Task(), CountReward())
    assert [m["step"] for m in resumed.train(resume=True)] == [0, 1, 2, 3]


def test_an_async_reward_is_cancelled_at_the_deadline(tmp_path):
    seen = {}

    async def slow(prompts, completions, **columns):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise
        return [1.0] * len(completions)

    reward = as_reward(slow)
    with pytest.raises(RewardTimeout):
        call_with_timeout(lambda: reward.score(["p"], [["a"], ["b"]]), 0.5, what="slow")
    deadline = time.monotonic() + 10
    while "cancelled" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == {"cancelled": True}


def test_a_reward_within_its_timeout_scores_as_without_one():
    reward = load_reward("numeric")
    got = call_with_timeout(lambda: reward.score(["2 + 2"], [["4"], ["5"]], {"answer": ["4"]}), 30)
    assert got.matrix.tolist() == [[1.0], [0.0]]
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, 30)
