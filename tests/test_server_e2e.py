"""`es-serve serve` end to end on vLLM: a job followed to its end, completions from the trained weights
through the `openai` client, a 200-request load test from a second process, and the dashboard in Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import httpx
import openai
import pytest

KEY = "e2e-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PLUGIN = "def distinct_chars(prompts, completions, **columns):\n    return [float(len(set(c))) for c in completions]\n"
STEPS = 3
MAX_TOKENS = 8

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(module_servers, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "rewards").mkdir()
    (root / "rewards" / "mine.py").write_text(PLUGIN)
    env = dict(os.environ, ES_SERVE_CACHE=str(root / "cache"), VLLM_LOGGING_LEVEL="ERROR")
    return module_servers.start(root / "runs", "--api-key", KEY, "--rewards-dir", str(root / "rewards"), env=env)


@pytest.fixture(scope="module")
def finished_job(server, tiny_model_dir):
    """A vLLM job on the tiny model, submitted and followed through its event stream to the end."""
    config = {
        "model": {"name": str(tiny_model_dir)},
        # N x P = 64 requests per step: also the engine's batch size for the load test.
        "es": {"population": 16, "sigma": 0.3, "lr": 0.05},
        "task": {"prompts_per_step": 4, "eval_prompts": 4},
        "reward": {"fn": "mine.py:distinct_chars"},
        "generation": {"max_tokens": MAX_TOKENS},
        "train": {"steps": STEPS, "eval_every": STEPS, "checkpoint_every": STEPS},
        "engine": {"kind": "vllm", "memory_fraction": 0.1},
    }
    r = httpx.post(server.url + "/v1/jobs", headers=AUTH, json={"config": config})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["run_dir"].endswith(job["id"])
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", headers=AUTH, timeout=600) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: ") :])))
    return job["id"], events


def test_a_job_runs_to_the_end_and_its_events_follow_every_step(server, finished_job):
    job_id, events = finished_job
    kinds = [kind for kind, _ in events]
    assert kinds == ["step"] * (STEPS + 1) + ["end"], kinds
    assert [data["step"] for _, data in events[:-1]] == list(range(STEPS + 1))
    end = events[-1][1]
    assert end["status"] == "succeeded", end.get("error")
    assert all(data["reward_mean"] > 1 for _, data in events[1:-1]), "the plugin reward scored every step"
    job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "succeeded" and job["step"] == STEPS
    assert job["last"]["step"] == STEPS and job["last"]["eval_reward"] is not None
    assert job["pure_tok_s"] > 0
    assert job_id in [j["id"] for j in httpx.get(server.url + "/v1/jobs", headers=AUTH).json()["data"]]
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert f'es_serve_job_step{{job="{job_id}"' in metrics and "es_serve_queue_length 0" in metrics
    assert f"es_serve_steps_total {STEPS}" in metrics


def test_completions_come_from_the_trained_weights(server, finished_job, tiny_model_dir):
    from rewards import get_task

    job_id, events = finished_job
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert job_id in [m.id for m in client.models.list().data]
    # The last evaluation answered held-out prompt 0 greedily with the trained weights; the chat
    # endpoint renders the same messages with the same template, so it must say the same.
    metrics = [json.loads(line) for line in open(f"{events[-1][1]['run_dir']}/metrics.jsonl")]
    row = get_task("arithmetic", seed=0).eval_rows(4)[0]
    chat = client.chat.completions.create(model=job_id, messages=row["messages"], max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == metrics[-1]["eval_sample"]
    assert chat.choices[0].finish_reason in ("stop", "length")

    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(tiny_model_dir)).apply_chat_template(
        row["messages"], tokenize=False, add_generation_prompt=True
    )
    done = client.completions.create(model=job_id, prompt=[prompt, "one two"], max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == metrics[-1]["eval_sample"]
    assert len(done.choices) == 2 and done.usage.completion_tokens > 0
    # The model's name answers from the engine's current weights: the job's.
    same = client.completions.create(model=str(tiny_model_dir), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert same.choices[0].text == done.choices[0].text

    # A zero-step job on the same model holds the untrained weights: the pure-inference baseline.
    config = json.loads(json.dumps(events[-1][1]["config"]))
    config["train"]["steps"] = 0
    base = httpx.post(server.url + "/v1/jobs", headers=AUTH, json={"config": config}).json()
    with httpx.stream("GET", f"{server.url}/v1/jobs/{base['id']}/events", headers=AUTH, timeout=300) as stream:
        assert list(stream.iter_lines())[-2].startswith("data: ")
    base_metrics = [json.loads(line) for line in open(f"{base['run_dir']}/metrics.jsonl")]
    assert base_metrics[0]["eval_sample"] == metrics[0]["eval_sample"]

    # Seeded samples follow the logits, so they tell trained from untrained weights where the
    # random model's greedy answers do not. Asking for the job again swaps its weights back in.
    # (The tiny random model is very sure of itself; at temperature 2 these prompts leave it some doubt.)
    prompts = [f"the answer is {w}" for w in ("one", "two", "the", "what", "sum", "total", "first", "then")]

    def sample(model):
        out = client.completions.create(model=model, prompt=prompts, max_tokens=MAX_TOKENS, temperature=2.0, seed=7)
        return [c.text for c in out.choices]

    trained, untrained, again = sample(job_id), sample(base["id"]), sample(job_id)
    assert trained == again, "the job's weights changed after serving another job"
    assert trained != untrained, "completions from the trained job equal those of the untrained weights"
    assert sample(base["id"]) == untrained


def test_unauthenticated_calls_are_refused(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/v1/jobs").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()


LOAD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import httpx

    url, key, model, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    async def one(client, i):
        body = {"model": model, "prompt": f"What is {i % 20} + {i % 7}?", "max_tokens": 4, "temperature": 0}
        start = time.perf_counter()
        try:
            r = await client.post(url + "/v1/completions", json=body)
            ok = r.status_code == 200
            text = r.json()["choices"][0]["text"] if ok else r.text[:200]
        except Exception as exc:
            ok, text = False, repr(exc)
        return ok, time.perf_counter() - start, i, text

    async def main():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        headers = {"Authorization": "Bearer " + key}
        async with httpx.AsyncClient(limits=limits, headers=headers, timeout=120) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(one(client, i) for i in range(n)))
            wall = time.perf_counter() - start
        lat = sorted(r[1] for r in results)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        print(json.dumps({
            "requests": n, "errors": [r for r in results if not r[0]][:5], "error_count": sum(not r[0] for r in results),
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lat[-1], "wall": wall,
            "texts": {r[2]: r[3] for r in results},
        }))

    asyncio.run(main())
    """
)


def test_200_concurrent_completions_from_another_process(server, finished_job, tmp_path):
    job_id, _ = finished_job
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    before = httpx.get(server.url + "/metrics", headers=AUTH).text
    done = subprocess.run(
        [sys.executable, str(script), server.url, KEY, job_id, "200"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\nload test: {report['requests']} concurrent completions, errors {report['error_count']}, latency "
        f"p50 {report['p50']:.2f} s, p90 {report['p90']:.2f} s, p99 {report['p99']:.2f} s, "
        f"max {report['max']:.2f} s, wall {report['wall']:.2f} s"
    )
    assert report["error_count"] == 0, report["errors"]
    texts = report["texts"]
    assert len(texts) == 200
    # Greedy answers do not depend on which batch a request landed in.
    for i in range(20, 200):
        if (i % 20, i % 7) == ((i - 140) % 20, (i - 140) % 7) and i >= 140:
            assert texts[str(i)] == texts[str(i - 140)]
    after = httpx.get(server.url + "/metrics", headers=AUTH).text

    def count(text, name):
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    requests = count(after, "es_serve_completion_requests_total") - count(before, "es_serve_completion_requests_total")
    batches = count(after, "es_serve_completion_batches_total") - count(before, "es_serve_completion_batches_total")
    assert requests == 200
    assert batches < 50, f"{batches} engine calls for 200 requests: the collector did not batch them"


def test_the_dashboard_shows_the_reward_curve_in_chromium(server, finished_job, tmp_path):
    job_id, events = finished_job
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run `bash launch/setup.sh --test` (it installs Debian's chromium)"
    # The page's data source carries the finished job's reward curve.
    data = httpx.get(f"{server.url}/v1/jobs/{job_id}/metrics", headers=AUTH).json()["data"]
    assert [r["step"] for r in data] == list(range(STEPS + 1))
    assert [r["reward_mean"] for r in data[1:]] == [d["reward_mean"] for _, d in events[1:-1]]

    shot = tmp_path / "dashboard.png"
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,800",
            "--virtual-time-budget=5000",
            f"{server.url}/?key={KEY}&job={job_id}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), done.stderr[-3000:]
    print(f"\ndashboard screenshot: {shot}")
    import numpy as np
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 800)
    pixels = np.asarray(image).astype(int)

    def near(colour):
        return int((np.abs(pixels - np.array(colour)).max(axis=-1) < 40).sum())

    # The curve is drawn in #1f6feb and the evaluations in #d9480f; a page that failed to load its
    # data shows neither (the legend alone has far fewer such pixels).
    blue, orange = near((0x1F, 0x6F, 0xEB)), near((0xD9, 0x48, 0x0F))
    assert blue > 300, f"only {blue} pixels of the reward curve's colour"
    assert orange > 30, f"only {orange} pixels of the eval points' colour"

    # The same page's DOM after its scripts ran: one curve point per training step, one dot per evaluation.
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            f"{server.url}/?key={KEY}&job={job_id}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    points = re.search(r'<polyline id="reward-line" points="([^"]*)"', dom)
    assert points, dom[-2000:]
    assert len(points.group(1).split()) == STEPS
    evaluated = [r for r in data if r.get("eval_reward") is not None]
    assert dom.count('class="eval"') == len(evaluated) == 2
    assert f"{STEPS} / {STEPS}" in dom
