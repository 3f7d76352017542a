"""The ES loop, checkpoints, the replay log and resume, on the dense engine (no vLLM needed)."""

import pytest
import torch
from fakes import CountReward, Task

from es_serve.config import load_config
from es_serve.engines.dense import DenseEngine
from es_serve.export import trained_weights
from es_serve.run_dir import RunDir
from es_serve.trainer import Trainer
from es_serve.weights import base_weights


def _config(**extra):
    sets = [
        "model.name=tiny",
        "es.population=6",
        "es.sigma=0.2",
        "es.lr=0.05",
        "es.noise_reuse=2",
        "task.prompts_per_step=2",
        "task.eval_prompts=3",
        "generation.max_tokens=6",
        "train.steps=5",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "engine.kind=dense",
    ]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture()
def dense(tiny_model_dir):
    return lambda: DenseEngine(tiny_model_dir, dtype=torch.float32)


def test_training_writes_metrics_checkpoints_and_replay(dense, tmp_path):
    config = _config()
    trainer = Trainer(config, tmp_path / "run", dense(), Task(), CountReward())
    metrics = trainer.train()
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4, 5]
    for m in metrics[1:]:
        for key in ("reward_mean", "reward_std", "gen_tokens", "gen_seconds", "update_seconds", "step_seconds"):
            assert key in m, key
    assert [m["step"] for m in metrics if "eval_reward" in m] == [0, 2, 4, 5]
    run = RunDir(tmp_path / "run")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000004.safetensors", "step_000005.safetensors"]
    replay = run.replay()
    assert [e["step"] for e in replay] == [1, 2, 3, 4, 5]
    assert [e["epoch"] for e in replay] == [0, 0, 1, 1, 2]  # noise reuse for 2 steps
    assert (tmp_path / "run" / "config.toml").read_text().count("population = 6") == 1


def test_replay_log_rebuilds_checkpointed_weights_from_the_base_model(dense, tiny_model_dir, tmp_path):
    engine = dense()
    Trainer(_config(), tmp_path / "run", engine, Task(), CountReward()).train()
    run = RunDir(tmp_path / "run")
    targets, weights = base_weights(tiny_model_dir, _config().es.modules)
    from es_serve.weights import replay_updates

    replay_updates(weights, targets, run.replay(), 0, 4)
    checkpoint = run.load_checkpoint(run.latest_checkpoint(at_most=4)[1])
    for name, w in weights.items():
        assert torch.equal(w, checkpoint[name]), name
    step, final = trained_weights(run, tiny_model_dir, _config().es.modules)
    assert step == 5
    for name, w in engine.state_dict().items():
        assert torch.equal(final[name], w), name


def test_resume_after_a_crash_gives_the_same_weights(dense, tmp_path):
    straight = Trainer(_config(), tmp_path / "a", dense(), Task(), CountReward())
    straight.train()

    first = Trainer(_config(), tmp_path / "b", dense(), Task(), CountReward(fail_on_call=6))
    with pytest.raises(RuntimeError, match="went away"):
        first.train()
    assert RunDir(tmp_path / "b").committed_step() == 3  # calls: eval 0, steps 1-2, eval 2, step 3, step 4
    resumed = Trainer(_config(), tmp_path / "b", dense(), Task(), CountReward())
    resumed.train(resume=True)
    for name, w in straight.engine.state_dict().items():
        assert torch.equal(resumed.engine.state_dict()[name], w), name
    assert [m["step"] for m in resumed.run.metrics()] == [0, 1, 2, 3, 4, 5]


def test_a_failing_reward_leaves_the_weights_unchanged(dense, tmp_path):
    trainer = Trainer(_config(), tmp_path / "run", dense(), Task(), CountReward(fail_on_call=2))
    before = trainer.engine.state_dict()
    with pytest.raises(RuntimeError):
        trainer.train()
    after = trainer.engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert RunDir(tmp_path / "run").committed_step() == 0


def test_refuses_to_overwrite_a_run(dense, tmp_path):
    Trainer(_config(**{"train.steps": 1}), tmp_path / "run", dense(), Task(), CountReward()).train()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_config(), tmp_path / "run", dense(), Task(), CountReward()).train()


def test_adam_with_schedules_resumes_bitwise_and_rebuilds_from_the_replay_log(dense, tiny_model_dir, tmp_path):
    from es_serve.weights import MissingOptimizerState

    extra = {
        "es.optimizer": "adam",
        "es.lr": 0.01,
        "es.lr_schedule": "cosine",
        "es.lr_min_ratio": 0.1,
        "es.warmup_steps": 1,
        "es.sigma_schedule": "linear",
        "es.sigma_min_ratio": 0.5,
    }
    config = _config(**extra)
    straight = Trainer(config, tmp_path / "a", dense(), Task(), CountReward())
    straight.train()
    replay = straight.run.replay()
    # By hand, T = 5: lr warms up in 1 step, then cosine from 0.01 at step 2 to 0.001 at step 5 (p = (t - 2) / 3);
    # sigma falls linearly from 0.2 to 0.1 (p = (t - 1) / 4).
    assert [e["lr"] for e in replay] == pytest.approx([0.01, 0.01, 0.00775, 0.00325, 0.001])
    assert [e["population"]["sigma"] for e in replay] == pytest.approx([0.2, 0.175, 0.15, 0.125, 0.1])
    assert all(e["optimizer"] == {"name": "adam", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8} for e in replay)
    final = straight.engine.state_dict()
    state = straight.engine.optimizer_state()
    assert int(state["optimizer/adam/step"][0]) == 5

    # Killed during step 4: resumed from the step-2 checkpoint (weights and Adam's moments) plus step 3's line.
    first = Trainer(config, tmp_path / "b", dense(), Task(), CountReward(fail_on_call=6))
    with pytest.raises(RuntimeError, match="went away"):
        first.train()
    run_b = RunDir(tmp_path / "b")
    assert run_b.committed_step() == 3 and run_b.latest_checkpoint()[0] == 2
    saved = run_b.load_checkpoint(run_b.latest_checkpoint()[1], optimizer_state=True)
    assert int(saved["optimizer/adam/step"][0]) == 2
    assert "optimizer/adam/step" not in run_b.load_checkpoint(run_b.latest_checkpoint()[1])
    resumed = Trainer(config, tmp_path / "b", dense(), Task(), CountReward())
    resumed.train(resume=True)
    for name, w in final.items():
        assert torch.equal(resumed.engine.state_dict()[name], w), name
    resumed_state = resumed.engine.optimizer_state()
    assert resumed_state.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(resumed_state[name], t), name

    # Without the last checkpoint, the weights come back from step 4's checkpoint and moments plus step 5's line.
    run_a = RunDir(tmp_path / "a")
    run_a.latest_checkpoint()[1].unlink()
    step, rebuilt = trained_weights(run_a, tiny_model_dir, config.es.modules)
    assert step == 5
    for name, w in final.items():
        assert torch.equal(rebuilt[name], w), name
    # A checkpoint without the moments cannot continue an Adam run: refused, naming the fix.
    ckpt_step, path = run_a.latest_checkpoint()
    run_a.save_checkpoint(ckpt_step, run_a.load_checkpoint(path))
    with pytest.raises(MissingOptimizerState, match="step_000004.safetensors holds no optimizer state.*adam"):
        trained_weights(run_a, tiny_model_dir, config.es.modules)
    with pytest.raises(MissingOptimizerState, match="rebuild everything from the replay log"):
        Trainer(config, tmp_path / "a", dense(), Task(), CountReward()).start(resume=True)
