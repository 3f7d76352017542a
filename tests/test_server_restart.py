"""The server stopped mid-job (SIGTERM, then SIGKILL) and restarted finishes the job, losing no step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KEY = "restart-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The pause keeps a step longer than the test's polling interval, so "kill one step later" cannot
# overshoot to the end of the job on a fast machine.
PLUGIN = (
    "import time\n"
    "def distinct_chars(prompts, completions, **columns):\n"
    "    time.sleep(0.3)\n"
    "    return [float(len(set(c))) for c in completions]\n"
)
STEPS = 8


def _config(model_dir):
    return {
        "model": {"name": str(model_dir)},
        "es": {"population": 2, "sigma": 0.3, "lr": 0.05},
        "task": {"prompts_per_step": 2, "eval_prompts": 1},
        "reward": {"fn": "mine.py:distinct_chars"},
        "generation": {"max_tokens": 4},
        "train": {"steps": STEPS, "eval_every": 3, "checkpoint_every": 4},
        "engine": {"kind": "dense"},
    }


def _replay(run_dir):
    path = Path(run_dir) / "replay.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigterm_and_sigkill_mid_job_then_restart_finish_the_job(servers, tiny_model_dir, tmp_path):
    rewards = tmp_path / "rewards"
    rewards.mkdir()
    (rewards / "mine.py").write_text(PLUGIN)
    runs = tmp_path / "runs"
    args = ("--api-key", KEY, "--rewards-dir", str(rewards), "--engine", "dense")
    env = dict(os.environ, ES_SERVE_CACHE=str(tmp_path / "cache"))
    # The same job run straight through with `es-serve train`, alongside the server (it shares nothing
    # with it but the CPUs): the reference the interrupted job's weights must equal at the end.
    reference = tmp_path / "reference"
    sets = [f"--set={k}.{kk}={json.dumps(v)}" for k, sec in _config(tiny_model_dir).items() for kk, v in sec.items()]
    sets = [s.replace("mine.py:distinct_chars", f"{rewards}/mine.py:distinct_chars") for s in sets]
    with open(tmp_path / "reference.log", "w") as log:  # a file, not a pipe nobody reads until the end
        done = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", *sets, "--out", str(reference), "--quiet"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    servers.procs.append(done)  # killed at teardown if the test fails before it ends

    server = servers.start(runs, *args, env=env)
    r = httpx.post(server.url + "/v1/jobs", headers=AUTH, json={"config": _config(tiny_model_dir)})
    assert r.status_code == 201, r.text
    job_id, run_dir = r.json()["id"], Path(r.json()["run_dir"])

    # SIGTERM after two committed steps: the step in progress finishes, a checkpoint is written, exit 0.
    _wait(lambda: len(_replay(run_dir)) >= 2, 120, "two committed steps")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=120) == 0, server.log.read_text()[-3000:]
    record = json.loads((runs / "jobs" / f"{job_id}.json").read_text())
    stopped_at = len(_replay(run_dir))
    assert record["status"] == "queued" and record["interrupted"] is True
    assert 2 <= stopped_at < STEPS and record["step"] == stopped_at
    assert (run_dir / "checkpoints" / f"step_{stopped_at:06d}.safetensors").is_file()

    # Restarted, it resumes on its own; SIGKILL it one step later (no chance to clean up).
    server = servers.start(runs, *args, env=env)
    _wait(lambda: len(_replay(run_dir)) > stopped_at, 120, "a step after the restart")
    assert httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).json()["resumed"] >= 1
    server.kill()
    server.wait()
    before_kill = _replay(run_dir)
    assert len(before_kill) < STEPS, "the job finished before it could be killed; make it longer"

    server = servers.start(runs, *args, env=env)
    final = _wait(
        lambda: (
            (j := httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).json())["status"] != "queued"
            and j["status"] != "running"
            and j
        ),
        180,
        "the job to finish",
    )
    assert final["status"] == "succeeded", final
    replay = _replay(run_dir)
    assert [e["step"] for e in replay] == list(range(1, STEPS + 1))
    assert replay[: len(before_kill)] == before_kill, "a committed step was lost or rewritten"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS + 1))

    # Interrupted twice, it ends with exactly the weights of the uninterrupted run started above.
    assert done.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert [e["shaped"] for e in _replay(reference)] == [e["shaped"] for e in replay]
    from es_serve.config import load_config
    from es_serve.export import trained_weights
    from es_serve.run_dir import RunDir

    modules = load_config(run_dir / "config.toml").es.modules
    a = trained_weights(RunDir(reference), tiny_model_dir, modules)[1]
    b = trained_weights(RunDir(run_dir), tiny_model_dir, modules)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
