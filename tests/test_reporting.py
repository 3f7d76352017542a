"""train.report_to: what TensorBoard, trackio and wandb received, read back with their own readers."""

import json
import logging

import pytest
import torch
from fakes import CountReward, Task

from es_serve.config import ConfigError, load_config
from es_serve.engines.dense import DenseEngine
from es_serve.reporting import report_names
from es_serve.trainer import Trainer


def _config(*extra):
    sets = [
        "model.name=tiny",
        "es.population=4",
        "es.sigma=0.2",
        "task.prompts_per_step=2",
        "task.eval_prompts=3",
        "generation.max_tokens=5",
        "train.steps=2",
        "train.eval_every=2",
        "engine.kind=dense",
    ]
    return load_config(None, sets + list(extra))


def _train(tiny_model_dir, run, *extra):
    engine = DenseEngine(tiny_model_dir, dtype=torch.float32)
    return Trainer(_config(*extra), run, engine, Task(), CountReward()).train()


def test_names_follow_trl_where_they_overlap():
    record = {
        "step": 3,
        "reward_mean": 0.5,
        "reward_std": 0.1,
        "reward/count": 0.5,
        "completions/mean_length": 4.0,
        "gen_tok_s": 100.0,
        "eval_reward": 0.25,
        "eval_stderr": 0.05,
        "eval_per_prompt": [1.0, 0.0],
        "eval_sample": "text",
        "recovered_from_replay": True,
        "reward_max": None,
    }
    assert report_names(record) == {
        "train/reward": 0.5,
        "train/reward_std": 0.1,
        "train/rewards/count/mean": 0.5,
        "train/completions/mean_length": 4.0,
        "train/gen_tok_s": 100.0,
        "eval/reward": 0.25,
        "eval/reward_stderr": 0.05,
    }


def test_report_to_accepts_transformers_spellings_and_refuses_unknown_tools():
    assert _config("train.report_to=tensorboard").train.report_to == ["tensorboard"]
    assert _config("train.report_to='tensorboard,trackio'").train.report_to == ["tensorboard", "trackio"]
    assert _config("train.report_to=all").train.report_to == ["trackio", "tensorboard", "wandb"]
    assert _config("train.report_to=none").train.report_to == []
    assert _config().train.report_to == []
    with pytest.raises(ConfigError, match="train.report_to"):
        _config("train.report_to=['mlflow']")


def _expected(metrics):
    """Every numeric metrics.jsonl value, under the reported names, computed here from the file."""
    want = {}
    for line in metrics:
        for key, value in line.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key.startswith("eval_"):
                name = "eval/" + {"reward": "reward", "stderr": "reward_stderr"}.get(key[5:], key[5:])
            elif key == "reward_mean":
                name = "train/reward"
            elif key.startswith("reward/"):
                name = f"train/rewards/{key[7:]}/mean"
            else:
                name = "train/" + key
            want[(name, line["step"])] = float(value)
    return want


def _wandb_history(path):
    """The history rows of a .wandb file: LevelDB log blocks of wandb's protobuf Records, read here directly."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk, rows = path.read_bytes(), 7, 32768, b"", []  # 7: wandb's own file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if size == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk += data[pos : pos + size]
        pos += size
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_every_tracker_receives_every_metrics_line_and_wandb_goes_offline_without_a_key(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    project = f"es-serve-test-{tmp_path.name}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written to the home directory
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="es_serve.reporting"):
        metrics = _train(tiny_model_dir, run, "train.report_to=all")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[1]["completions/max_length"] <= 5
    want = _expected(metrics)
    assert ("train/reward", 2) in want and ("eval/reward", 0) in want and ("train/rewards/count/mean", 1) in want

    acc = EventAccumulator(str(run / "runs"))
    acc.Reload()
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key  # TensorBoard stores float32

    logs = SQLiteStorage.get_logs(project, "run")
    got = {(k, row["step"]): v for row in logs for k, v in row.items() if k in {n for n, _ in want}}
    assert got == want

    offline = [r for r in caplog.records if "offline" in r.getMessage()]
    assert len(offline) == 1, caplog.text
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    got = {(k, row["_step"]): v for row in _wandb_history(path) for k, v in row.items() if not k.startswith("_")}
    assert got == pytest.approx(want)
