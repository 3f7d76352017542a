"""Server jobs on dataset tasks: files only inside --data-dir, and a 422 naming the field for bad data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from es_serve.server import ServerSettings, create_app, parse_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1)} for i in range(8)]
    (path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "secret.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    return path


def _client(tmp_path, data_dir):
    return TestClient(create_app(ServerSettings(runs=tmp_path / "runs", data_dir=data_dir)))


def _job(client, task, reward="numeric"):
    config = {"model": {"name": "tiny-llama"}, "task": task, "train": {"steps": 0}}
    if reward:
        config["reward"] = {"fn": reward}
    return client.post("/v1/jobs", json={"config": config})


@pytest.mark.parametrize(
    "task,reward,field,text",
    [
        ({"dataset": "../secret.jsonl"}, "numeric", "task.dataset", "outside the data directory"),
        ({"dataset": "/etc/hostname"}, "numeric", "task.dataset", "outside the data directory"),
        ({"dataset": "someone/hub-dataset"}, "numeric", "task.dataset", "no file or directory"),
        ({"dataset": "chat.jsonl", "prompt_column": "q"}, "numeric", "task.prompt_column", "columns: prompt, answer"),
        ({"dataset": "chat.jsonl", "eval_prompts": 8}, "numeric", "task.eval_prompts", "would hold out all 8"),
        ({"dataset": "chat.jsonl", "eval_prompts": 2}, None, "reward.fn", "no default reward"),
        ({"eval_split": "test"}, "numeric", "task.eval_split", "set task.dataset too"),
    ],
)
def test_bad_dataset_jobs_get_422_naming_the_field(tmp_path, data_dir, task, reward, field, text):
    with _client(tmp_path, data_dir) as client:
        r = _job(client, task, reward)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert [d["field"] for d in detail] == [field], detail
        assert text in detail[0]["msg"]
        assert client.get("/v1/jobs").json()["data"] == []


def test_a_dataset_inside_the_data_dir_is_accepted_and_none_without_one(tmp_path, data_dir):
    # parse_job is what POST /v1/jobs runs before queueing (no engine is started here).
    job = {"config": {"model": {"name": "tiny-llama"}, "task": {"dataset": "chat.jsonl", "eval_prompts": 2}}}
    job["config"]["reward"] = {"fn": "numeric"}
    config = parse_job(job, ServerSettings(runs=tmp_path / "runs", data_dir=data_dir))
    assert config.task.name == "dataset" and config.task.dataset == "chat.jsonl"
    with _client(tmp_path / "other", None) as client:
        r = _job(client, {"dataset": str(data_dir / "chat.jsonl"), "eval_prompts": 2})
        assert r.status_code == 422
        assert "start it with --data-dir" in r.json()["detail"][0]["msg"]


def test_serve_refuses_a_data_dir_that_is_not_a_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "serve", "--data-dir", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"--data-dir {tmp_path / 'nope'} is not a directory" in result.stderr
