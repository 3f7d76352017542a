"""Faults injected into the training server, in process on the dense engine: cancels at every stage,
job records updated concurrently, a hanging reward, full queues, malformed credentials, /metrics and
each job's log."""

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from es_serve.server import ServerSettings, create_app
from es_serve.server.engine_slot import EngineSlot
from es_serve.server.jobs import JobStore
from es_serve.server.limits import AdmissionGate, Full

KEY = "clé-🔑"  # non-ASCII on purpose: it used to answer 500
AUTH = {"Authorization": f"Bearer {KEY}".encode()}
REWARDS = """
import time

def count_e(prompts, completions, **columns):
    return [float(c.count("e")) for c in completions]

def hang(prompts, completions, **columns):
    time.sleep(120)  # a reward that never answers in time (math-verify on a pathological input)
    return [0.0 for c in completions]
"""


def _config(model_dir, **train):
    return {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "es": {"population": 4, "sigma": 0.2},
        "task": {"prompts_per_step": 2, "eval_prompts": 2},
        "reward": {"fn": "mine.py:count_e"},
        "generation": {"max_tokens": 4},
        "train": {"steps": 2, "eval_every": 100, "checkpoint_every": 100, **train},
        "engine": {"kind": "dense"},
    }


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text(REWARDS)
    return ServerSettings(api_key=KEY, runs=tmp_path / "runs", rewards_dir=tmp_path / "rewards", engine="dense")


def _wait(client, job_id, until, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the expected state: {job}")


def _submit(client, config):
    r = client.post("/v1/jobs", headers=AUTH, json={"config": config})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _metrics(client):
    text = client.get("/metrics", headers=AUTH).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families, name, sample_name=None, **labels):
    for sample in families[name].samples:
        if (sample_name is None or sample.name == sample_name) and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            return sample.value
    return None


@pytest.mark.parametrize(
    "header",
    [
        "Bearer clé-🔑".encode("latin-1", "replace"),  # the key in another encoding
        "Bearer ключ".encode(),
        b"Bearer \xff\xfe\x00",
        b"Bearer",
        b"Bearer ",
        b"Basic " + KEY.encode(),
        KEY.encode(),
        b"",
        b"\xc3\x28",
    ],
)
def test_malformed_or_non_ascii_credentials_get_401_never_500(settings, header):
    with TestClient(create_app(settings)) as client:
        r = client.get("/v1/jobs", headers={"Authorization": header})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_non_ascii_key_opens_the_api_and_the_dashboard(settings):
    from urllib.parse import quote

    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/jobs", headers=AUTH).status_code == 200
        assert client.get("/?key=" + quote(KEY)).status_code == 200
        assert client.get("/?key=" + quote("clé")).status_code == 401
        assert client.get("/?key=%ff%fe").status_code == 401


def test_concurrent_updates_of_a_job_record_never_lose_a_cancel(tmp_path, monkeypatch):
    import es_serve.server.jobs as jobs

    store = JobStore(tmp_path)
    store.save({"id": "job-1", "status": "running", "step": 0, "created": 0})
    writing, release, real = threading.Event(), threading.Event(), jobs.atomic_write

    def slow_write(path, data):
        if b'"step": 1' in data and not release.is_set():
            writing.set()
            release.wait(30)  # the worker's step update is in the middle of its write
        real(path, data)

    monkeypatch.setattr(jobs, "atomic_write", slow_write)
    worker = threading.Thread(target=store.update, args=("job-1",), kwargs={"step": 1})
    worker.start()
    assert writing.wait(30)
    canceller = threading.Thread(target=store.update, args=("job-1",), kwargs={"cancel_requested": True})
    canceller.start()
    canceller.join(0.5)  # it must wait for the step update rather than read the record under it
    release.set()
    worker.join(30)
    canceller.join(30)
    assert store.get("job-1")["cancel_requested"] is True and store.get("job-1")["step"] == 1
    assert JobStore(tmp_path).get("job-1") == store.get("job-1")  # and so does the file


def test_cancels_are_honoured_queued_while_building_and_while_training(settings, tiny_model_dir, monkeypatch):
    building, release = threading.Event(), threading.Event()
    real_ensure = EngineSlot.ensure

    def slow_ensure(self, config, model_dir):
        if self.engine is None:
            building.set()
            assert release.wait(60)
        return real_ensure(self, config, model_dir)

    monkeypatch.setattr(EngineSlot, "ensure", slow_ensure)
    with TestClient(create_app(settings)) as client:
        first = _submit(client, _config(tiny_model_dir))
        queued = _submit(client, _config(tiny_model_dir))
        assert building.wait(60)
        # Cancelled while its engine is being built, and another while it waits in the queue.
        assert client.post(f"/v1/jobs/{first}/cancel", headers=AUTH).json()["cancel_requested"] is True
        assert client.post(f"/v1/jobs/{queued}/cancel", headers=AUTH).json()["status"] == "cancelled"
        release.set()
        job = _wait(client, first, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert job["status"] == "cancelled" and job["step"] == 0, job
        assert "cancelled while its engine was being built" in client.get(f"/v1/jobs/{first}/log", headers=AUTH).text
        assert client.get(f"/v1/jobs/{queued}", headers=AUTH).json()["status"] == "cancelled"

        # Cancelled while training: it stops at a step boundary and that step stays committed.
        running = _submit(client, _config(tiny_model_dir, steps=500))
        _wait(client, running, lambda j: j["step"] >= 1)
        client.post(f"/v1/jobs/{running}/cancel", headers=AUTH)
        job = _wait(client, running, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert job["status"] == "cancelled" and 1 <= job["step"] < 500
        from es_serve.run_dir import RunDir

        assert RunDir(job["run_dir"]).committed_step() == job["step"]
        log = client.get(f"/v1/jobs/{running}/log", headers=AUTH).text
        assert f"job {running} step 1:" in log and f"job {running} cancelled at step {job['step']}" in log

        families = _metrics(client)
        assert families["es_serve_steps"].type == "counter"
        assert _value(families, "es_serve_steps", "es_serve_steps_total") == job["step"]
        assert families["es_serve_step_seconds"].type == "histogram"
        assert _value(families, "es_serve_step_seconds", "es_serve_step_seconds_count") == job["step"]
        assert _value(families, "es_serve_jobs", status="cancelled") == 3
        # Per-job series: only the latest job's, however many jobs the server has seen.
        assert {s.labels["job"] for s in families["es_serve_job_step"].samples} == {running}

        # The completion handler feeds the latency histogram.
        r = client.post("/v1/completions", headers=AUTH, json={"model": running, "prompt": "1 + 1 =", "max_tokens": 3})
        assert r.status_code == 200, r.text
        families = _metrics(client)
        assert families["es_serve_completion_latency_seconds"].type == "histogram"
        assert _value(families, "es_serve_completion_latency_seconds", "es_serve_completion_latency_seconds_count") == 1
        assert _value(families, "es_serve_completion_requests", "es_serve_completion_requests_total") == 1
        tokens = r.json()["usage"]["completion_tokens"]
        assert _value(families, "es_serve_completion_tokens", "es_serve_completion_tokens_total") == tokens


def test_a_hanging_reward_fails_the_job_cleanly_with_its_traceback_in_the_job_log(settings, tiny_model_dir):
    config = _config(tiny_model_dir)
    config["reward"] = {"fn": "mine.py:hang", "timeout_s": 1}
    with TestClient(create_app(settings)) as client:
        job_id = _submit(client, config)
        job = _wait(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert job["status"] == "failed" and "RewardTimeout" in job["error"] and "reward.timeout_s" in job["error"]
        log = client.get(f"/v1/jobs/{job_id}/log", headers=AUTH).text
        assert "Traceback (most recent call last)" in log and "RewardTimeout" in log
        assert client.get(f"/v1/jobs/{job_id}/log").status_code == 401
        assert client.get("/v1/jobs/job-nope/log", headers=AUTH).status_code == 404


def test_full_queues_answer_429_with_retry_after(settings, tiny_model_dir, monkeypatch):
    from es_serve.server.jobs import JobManager

    started, release = threading.Event(), threading.Event()

    def blocked_run(self, job_id):
        started.set()
        release.wait(60)

    monkeypatch.setattr(JobManager, "_run", blocked_run)
    settings.max_queued_jobs, settings.max_pending_completions = 2, 0
    with TestClient(create_app(settings)) as client:
        try:
            _submit(client, _config(tiny_model_dir))
            assert started.wait(30)  # the worker holds the first; two more may wait
            _submit(client, _config(tiny_model_dir))
            _submit(client, _config(tiny_model_dir))
            r = client.post("/v1/jobs", headers=AUTH, json={"config": _config(tiny_model_dir)})
            assert r.status_code == 429 and r.headers["retry-after"] == "60"
            assert "--max-queued-jobs" in r.json()["error"]["message"]
            r = client.post("/v1/completions", headers=AUTH, json={"model": "x", "prompt": "hi"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            families = _metrics(client)
            assert _value(families, "es_serve_rejected_requests", "es_serve_rejected_requests_total", queue="jobs") == 1
            assert _value(families, "es_serve_queue_length") == 2
        finally:
            release.set()


def test_the_completion_gate_admits_up_to_its_bound():
    async def scenario():
        gate, hold = AdmissionGate(2, 1), asyncio.Event()

        async def request():
            async with gate.admit():
                await hold.wait()

        held = [asyncio.create_task(request()) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Full, match="at most 2"):
            async with gate.admit():
                pass
        hold.set()
        await asyncio.gather(*held)
        async with gate.admit():  # room again once they are answered
            assert gate.pending == 1
        assert gate.pending == 0

    asyncio.run(scenario())
