"""Replay logs name their noise version: old runs (no "noise" field) replay with version 1."""

import json
import logging
import math
import shutil

import pytest
import torch
from fakes import CountReward, Task

from adapters import NoiseKey
from es_serve.config import load_config
from es_serve.engines.dense import DenseEngine
from es_serve.export import trained_weights
from es_serve.run_dir import RunDir
from es_serve.trainer import Trainer
from es_serve.weights import base_weights


def _config(steps):
    sets = [
        "model.name=tiny",
        "es.population=4",
        "es.rank=2",
        "es.sigma=0.2",
        "es.lr=0.05",
        "task.prompts_per_step=1",
        "task.eval_prompts=1",
        "generation.max_tokens=3",
        f"train.steps={steps}",
        "train.eval_every=100",
        "train.checkpoint_every=100",
        "engine.kind=dense",
    ]
    return load_config(None, sets)


def _v1_reference(weights, targets, entries):
    """base + sum over steps of lr / (N sqrt r) sum_k c_k A_k B_k^T in float64, the factors drawn straight
    from torch.randn on the key's generator: version 1's definition, not the update code."""
    out = {k: v.double() for k, v in weights.items()}
    for e in entries:
        pop = e["population"]
        n, r = pop["size"], pop["rank"]
        f = e["shaped"]
        factor = e["lr"] / (n * math.sqrt(r))
        for t in targets:
            for k in range(n // 2):
                gen = torch.Generator().manual_seed(
                    NoiseKey(e["seed"], e["epoch"], k, t.layer, t.module).generator_seed()
                )
                z = torch.randn((t.out_features + t.in_features, r), generator=gen).double()
                a, b = z[: t.out_features], z[t.out_features :]
                out[t.param] += factor * (f[2 * k] - f[2 * k + 1]) * (a @ b.T)
    return out


@pytest.fixture(scope="module")
def old_run_template(tiny_model_dir, tmp_path_factory):
    """A two-step run as the code before noise versions wrote it: no "noise" field, no checkpoint."""
    path = tmp_path_factory.mktemp("old") / "run"
    Trainer(_config(2), path, DenseEngine(tiny_model_dir, dtype=torch.float32), Task(), CountReward()).train()
    run = RunDir(path)
    entries = run.replay()
    assert [e["noise"] for e in entries] == [2, 2]  # what this code writes
    for e in entries:
        del e["noise"]
    run.replay_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    shutil.rmtree(run.checkpoints)
    run.checkpoints.mkdir()
    return path


@pytest.fixture()
def old_run(old_run_template, tmp_path):
    shutil.copytree(old_run_template, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    return run, run.replay()


def test_old_run_replays_exports_and_resumes_with_version_1(old_run, tiny_model_dir, tmp_path, caplog):
    run, entries = old_run
    modules = _config(2).es.modules
    targets, base = base_weights(tiny_model_dir, modules)
    want = _v1_reference(base, targets, entries)

    with caplog.at_level(logging.WARNING, logger="es_serve.weights"):
        step, exported = trained_weights(run, tiny_model_dir, modules)
    assert step == 2
    assert "noise version 1" in caplog.text and "torch's CPU kernels" in caplog.text
    for t in targets:
        err = (exported[t.param].double() - want[t.param]).abs().max().item()
        moved = (want[t.param] - base[t.param].double()).abs().max().item()
        assert moved > 1e-3 and err < 1e-6 * (1 + moved), t.param

    # Resuming rebuilds the same weights, then trains on with version 2 and says so in the log.
    engine = DenseEngine(tiny_model_dir, dtype=torch.float32)
    trainer = Trainer(_config(3), tmp_path / "run", engine, Task(), CountReward())
    assert trainer.start(resume=True) == 2
    for name, w in engine.state_dict().items():
        assert torch.equal(w, exported[name]), name
    trainer.train_step()
    assert [e.get("noise") for e in run.replay()] == [None, None, 2]
    _, final = trained_weights(run, tiny_model_dir, modules)
    for name, w in engine.state_dict().items():
        assert torch.equal(final[name], w), name


def test_replaying_with_version_2_would_give_other_weights(old_run, tiny_model_dir):
    """The version matters: the same log read as version 2 lands far from the version 1 weights."""
    run, entries = old_run
    modules = _config(2).es.modules
    targets, base = base_weights(tiny_model_dir, modules)
    want = _v1_reference(base, targets, entries)
    run.replay_path.write_text("".join(json.dumps({**e, "noise": 2}) + "\n" for e in entries))
    _, as_v2 = trained_weights(run, tiny_model_dir, modules)
    assert max((as_v2[t.param].double() - want[t.param]).abs().max().item() for t in targets) > 1e-3


def test_unknown_noise_version_is_refused_by_name(old_run, tiny_model_dir, tmp_path):
    run, entries = old_run
    entries[1]["noise"] = 7
    run.replay_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(ValueError, match="replay step 2 names noise version 7.*knows 1, 2"):
        trained_weights(run, tiny_model_dir, _config(2).es.modules)
    trainer = Trainer(
        _config(3), tmp_path / "run", DenseEngine(tiny_model_dir, dtype=torch.float32), Task(), CountReward()
    )
    with pytest.raises(ValueError, match="noise version 7"):
        trainer.start(resume=True)
