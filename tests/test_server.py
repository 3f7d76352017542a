"""The training server's guard rails, in process: API key, job validation, reward restrictions, bounds."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from es_serve.server import FieldErrors, ServerSettings, create_app, parse_job
from es_serve.server.batcher import CompletionBatcher
from es_serve.types import Completion, Sampling

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PLUGIN = "def distinct_chars(prompts, completions, **columns):\n    return [float(len(set(c))) for c in completions]\n"


@pytest.fixture
def rewards_dir(tmp_path):
    path = tmp_path / "rewards"
    path.mkdir()
    (path / "mine.py").write_text(PLUGIN)
    return path


@pytest.fixture
def client(tmp_path, rewards_dir):
    settings = ServerSettings(api_key=KEY, runs=tmp_path / "runs", rewards_dir=rewards_dir, max_body_bytes=4096)
    with TestClient(create_app(settings)) as client:
        yield client


ROUTES = [
    ("get", "/"),
    ("get", "/metrics"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/job-x"),
    ("get", "/v1/jobs/job-x/events"),
    ("get", "/v1/jobs/job-x/metrics"),
    ("post", "/v1/jobs/job-x/cancel"),
    ("get", "/v1/models"),
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
]


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_but_health_needs_the_key(client, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert "Authorization: Bearer" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_health_is_open_and_the_key_opens_the_rest(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/jobs", headers=AUTH).json() == {"object": "list", "data": []}
    assert "es_serve_queue_length 0" in client.get("/metrics", headers=AUTH).text
    # A browser opens the dashboard with ?key=; that works for the page only, not for the API.
    assert client.get(f"/?key={KEY}").status_code == 200
    assert "<svg" in client.get(f"/?key={KEY}").text
    assert client.get(f"/v1/jobs?key={KEY}").status_code == 401


def _job(client, config):
    return client.post("/v1/jobs", headers=AUTH, json={"config": config})


def test_a_malformed_job_gets_422_naming_each_field(client):
    r = _job(client, {"es": {"population": "eight", "sigmaa": 1}, "train": {"steps": -1}})
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["detail"]}
    assert fields == {"es.population", "es.sigmaa", "train.steps"}
    message = r.json()["error"]["message"]
    assert "es.population" in message and "unknown key 'es.sigmaa'" in message and "train.steps" in message

    r = client.post("/v1/jobs", headers=AUTH, json={"config": {}, "priority": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "priority"
    r = client.post("/v1/jobs", headers=AUTH, content=b"{not json")
    assert r.status_code == 422 and "not JSON" in r.json()["error"]["message"]
    r = _job(client, {"task": {"name": "chess"}, "model": {"name": "/no/such/model"}})
    assert r.status_code == 422
    assert {d["field"] for d in r.json()["detail"]} == {"task.name", "model.name"}
    r = _job(client, {"generation": {"max_tokens": 5000}})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "generation.max_tokens"
    assert client.get("/v1/jobs", headers=AUTH).json()["data"] == [], "a refused job must not be queued"


@pytest.mark.parametrize(
    "spec,why",
    [
        ("no_such_reward", "unknown reward 'no_such_reward'"),
        ("os:system", "module imports are not accepted"),
        ("/etc/passwd.py:f", "outside the reward directory"),
        ("../mine.py:distinct_chars", "outside the reward directory"),
        ("http://example.com/score", "reward server URLs are not accepted"),
    ],
)
def test_rewards_come_only_from_allowed_places(client, spec, why):
    r = _job(client, {"reward": {"fn": spec}})
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["field"] == "reward.fn"
    assert why in detail["msg"]
    # The refusal lists what is allowed.
    assert (
        "built-in rewards: countdown, exact, format_answer_tag, format_number, length_penalty, math, numeric"
        in (detail["msg"])
    )
    assert "file.py:function" in detail["msg"]


def test_a_reward_file_in_the_rewards_dir_is_accepted(rewards_dir, tmp_path):
    settings = ServerSettings(runs=tmp_path / "runs", rewards_dir=rewards_dir)
    config = parse_job(
        {"config": {"model": {"name": "tiny-llama"}, "reward": {"fn": "mine.py:distinct_chars"}}}, settings
    )
    assert config.reward.fn == "mine.py:distinct_chars"
    with pytest.raises(FieldErrors, match="no file or module rewards are accepted"):
        parse_job({"config": {"reward": {"fn": "mine.py:distinct_chars"}}}, ServerSettings(runs=tmp_path / "r2"))


def test_bodies_and_generation_lengths_are_bounded(client):
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "x" * 5000})
    assert r.status_code == 413
    r = client.post("/v1/completions", headers=AUTH, json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 4096})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    r = client.post("/v1/completions", headers=AUTH, json={"model": "tiny-llama", "prompt": "hi", "n": 100})
    assert r.status_code == 422 and "n: at most" in r.json()["error"]["message"]
    # A body vLLM's protocol model refuses gets vLLM's answer: 400 naming the parameter.
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "hi", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"].endswith("temperature")
    r = client.post("/v1/completions", headers=AUTH, json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and "unknown model 'gpt-4'" in r.json()["error"]["message"]
    assert "tiny-llama" in r.json()["error"]["message"]
    assert client.get("/v1/jobs/job-nope", headers=AUTH).status_code == 404


def test_the_default_settings_listen_on_loopback():
    assert ServerSettings().host == "127.0.0.1"


def test_concurrent_completions_are_answered_by_few_batched_calls():
    calls = []

    def run_group(target, sampling, prompts):
        calls.append(len(prompts))
        return [Completion(f"{target}:{p}", [1] * sampling.max_tokens) for p in prompts], [1] * len(prompts)

    async def main():
        batcher = CompletionBatcher(run_group, window_s=0.02)
        batcher.start()
        greedy = Sampling(max_tokens=3)
        results = await asyncio.gather(*(batcher.submit("job-a", [f"p{i}"], greedy) for i in range(50)))
        other = await asyncio.gather(
            batcher.submit("job-a", ["q"], Sampling(max_tokens=5)), batcher.submit("job-b", ["q"], greedy)
        )
        await batcher.stop()
        return results, other

    results, other = asyncio.run(main())
    assert [r[0][0].text for r in results] == [f"job-a:p{i}" for i in range(50)]
    assert calls[0] == 50, calls  # one engine call for the 50 concurrent requests
    # Different weights or decoding settings never share a call.
    assert other[0][0][0].text == "job-a:q" and len(other[0][0][0].token_ids) == 5
    assert other[1][0][0].text == "job-b:q"
    assert sorted(calls[1:]) == [1, 1]


def test_serve_command_errors_are_one_clear_line(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, expected in [
            (["--port", str(port)], f"port {port} on 127.0.0.1 is already in use"),
            (["--rewards-dir", str(tmp_path / "nope")], "is not a directory"),
            (["--max-pending-completions", "0"], "--max-pending-completions must be at least 1, got 0"),
        ]:
            done = subprocess.run(
                [sys.executable, "-m", "launch.cli", "serve", "--runs", str(tmp_path / "runs"), *args],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2, done.stderr
            assert expected in done.stderr and "Traceback" not in done.stderr
