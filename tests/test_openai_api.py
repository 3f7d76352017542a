"""`es-serve serve` speaks vLLM's OpenAI API: each answer is compared with a plain vLLM `LLM` on the same weights.

The server (a subprocess) serves a zero-step job on the tiny model, so its weights are the model's own;
the reference is vLLM's offline LLM in this process, loaded from the same directory with the same dtype.
"""

import asyncio
import json
import math
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest

KEY = "openai-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PLUGIN = "def distinct_chars(prompts, completions, **columns):\n    return [float(len(set(c))) for c in completions]\n"
# A reward slow enough that a job stays in training while the test asks for completions.
SLOW = "import time\ndef slow(prompts, completions, **columns):\n    time.sleep(1.0)\n    return [float(len(c)) for c in completions]\n"
PROMPTS = ["What is 2 + 3? The answer is", "one two three", "the sum of four and five"]
DATA = Path(__file__).with_name("data")
BOS = 1  # <|im_start|>, the tiny tokenizer's BOS token

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that adds a BOS token, so prompts tokenized the wrong way show."""
    path = tmp_path_factory.mktemp("bos-model") / "model"
    shutil.copytree(tiny_model_dir, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [BOS], "tokens": ["<|im_start|>"]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def server(module_servers, tmp_path_factory, model_dir):
    """The server and the id of a finished zero-step job on the tiny model: its weights are the model's."""
    root = tmp_path_factory.mktemp("openai-server")
    (root / "rewards").mkdir()
    (root / "rewards" / "mine.py").write_text(PLUGIN)
    (root / "rewards" / "slow.py").write_text(SLOW)
    env = dict(os.environ, ES_SERVE_CACHE=str(root / "cache"), VLLM_LOGGING_LEVEL="ERROR")
    proc = module_servers.start(root / "runs", "--api-key", KEY, "--rewards-dir", str(root / "rewards"), env=env)
    config = {
        "model": {"name": str(model_dir)},
        # The engine runs at most one step's N x P = 16 sequences at once: the load test queues past that.
        "es": {"population": 8},
        "task": {"prompts_per_step": 2, "eval_prompts": 1},
        "reward": {"fn": "mine.py:distinct_chars"},
        "generation": {"max_tokens": 8},
        "train": {"steps": 0},
        "engine": {"kind": "vllm", "memory_fraction": 0.1},
    }
    job = httpx.post(proc.url + "/v1/jobs", headers=AUTH, json={"config": config}).json()
    with httpx.stream("GET", f"{proc.url}/v1/jobs/{job['id']}/events", headers=AUTH, timeout=600) as stream:
        ends = [line for line in stream.iter_lines() if line.startswith("event: end")]
    assert ends, "the job's event stream ended without an end event"
    final = httpx.get(f"{proc.url}/v1/jobs/{job['id']}", headers=AUTH).json()
    assert final["status"] == "succeeded", final
    proc.job, proc.config = job["id"], config
    return proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(model_dir):
    """vLLM's offline engine on the same weights and dtype as the server's engine: the independent reference."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from es_serve.engines.sizing import resolve_dtype

    llm = LLM(
        model=str(model_dir),
        dtype=resolve_dtype("auto"),
        max_model_len=512,
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        # Sized outright, as es-serve's engines are: a share of the memory node would count what the
        # suite's earlier in-process engines left in this process against it and, on a machine whose
        # node holds half the RAM, leave nothing for the KV cache.
        kv_cache_memory_bytes=256 << 20,
        seed=0,
    )
    yield llm
    del llm


def ref(llm, prompts, **params):
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(**params), use_tqdm=False)


def close(a, b, tol=2e-3):
    return a is not None and b is not None and math.isclose(a, b, abs_tol=tol)


def test_completions_greedy_text_and_logprobs_match_plain_vllm(client, server, reference):
    expected = ref(reference, PROMPTS, max_tokens=8, temperature=0, logprobs=2)
    done = client.completions.create(model=server.job, prompt=PROMPTS, max_tokens=8, temperature=0, logprobs=2)
    assert done.model == server.job
    for choice, want in zip(done.choices, expected, strict=True):
        out = want.outputs[0]
        assert choice.text == out.text
        assert choice.finish_reason == out.finish_reason
        assert len(choice.logprobs.token_logprobs) == len(out.token_ids)
        for got, tid, top, lps in zip(
            choice.logprobs.token_logprobs, out.token_ids, choice.logprobs.top_logprobs, out.logprobs, strict=True
        ):
            assert close(got, lps[tid].logprob), (got, lps[tid].logprob)
            assert len(top) == 2 and math.isclose(max(top.values()), got, abs_tol=1e-6)  # greedy: the top token
    assert done.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in expected)

    # Streaming: the same text, in more than one chunk (tokens arrive as the engine makes them).
    stream = client.completions.create(
        model=server.job,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected[0].outputs[0].text
    assert len([t for t in texts if t]) > 1, texts
    assert chunks[-1].usage.completion_tokens == len(expected[0].outputs[0].token_ids)


def test_chat_greedy_text_and_top_logprobs_match_plain_vllm(client, server, reference):
    from vllm import SamplingParams

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    want = reference.chat(messages, SamplingParams(max_tokens=8, temperature=0, logprobs=3), use_tqdm=False)
    out = want[0].outputs[0]
    done = client.chat.completions.create(
        model=server.job, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = done.choices[0]
    assert choice.message.content == out.text
    got = [t.logprob for t in choice.logprobs.content]
    assert all(close(g, lp[t].logprob) for g, t, lp in zip(got, out.token_ids, out.logprobs, strict=True))
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)

    stream = client.chat.completions.create(
        model=server.job, messages=messages, max_tokens=8, temperature=0, stream=True, logprobs=True
    )
    deltas, streamed = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
            streamed += [t.logprob for t in chunk.choices[0].logprobs.content]
    assert "".join(deltas) == out.text and len(deltas) > 1
    assert all(close(a, b) for a, b in zip(streamed, got, strict=True))


def test_stop_sequences_cut_where_plain_vllm_cuts(client, server, reference):
    full = ref(reference, PROMPTS[:1], max_tokens=12, temperature=0)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    done = client.completions.create(model=server.job, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert done.choices[0].text == full[: full.index(stop)]
    assert done.choices[0].finish_reason == "stop"
    assert (
        done.choices[0].text
        == ref(reference, PROMPTS[:1], max_tokens=12, temperature=0, stop=[stop])[0].outputs[0].text
    )


def test_echo_gives_the_prompt_logprobs_lm_eval_reads(client, server, reference):
    prompt = PROMPTS[2]
    want = ref(reference, [prompt], max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)[0]
    done = client.completions.create(
        model=server.job, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    lp = done.choices[0].logprobs
    assert done.choices[0].text == prompt + want.outputs[0].text
    # The prompt's tokens as vLLM's server tokenizes them (with the BOS token if the tokenizer adds one).
    n = len(want.prompt_token_ids)
    assert want.prompt_token_ids[0] == BOS and done.usage.prompt_tokens == n
    assert len(lp.token_logprobs) == n + 1 and lp.token_logprobs[0] is None
    for got, tid, ref_lp in zip(
        lp.token_logprobs[1:n], want.prompt_token_ids[1:], want.prompt_logprobs[1:], strict=True
    ):
        assert close(got, ref_lp[tid].logprob)

    # max_tokens=0: the prompt alone, scored (vLLM's echo without generation).
    alone = client.completions.create(model=server.job, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert alone.choices[0].text == prompt
    scored = alone.choices[0].logprobs.token_logprobs
    assert len(scored) == n and scored[0] is None
    assert all(close(a, b) for a, b in zip(scored[1:], lp.token_logprobs[1:n], strict=True))


def test_sampling_parameters_match_plain_vllm(client, server, reference):
    """n > 1 with a seed, penalties, top_k and min_p: the same samples as vLLM given the same parameters."""
    params = dict(temperature=1.0, seed=11, presence_penalty=0.5, frequency_penalty=0.3)
    extra = dict(repetition_penalty=1.2, top_k=20, min_p=0.05)
    want = ref(reference, PROMPTS[:1], max_tokens=8, n=3, **params, **extra)[0]
    done = client.completions.create(model=server.job, prompt=PROMPTS[0], max_tokens=8, n=3, extra_body=extra, **params)
    assert [c.text for c in done.choices] == [o.text for o in want.outputs]
    assert len({c.text for c in done.choices}) > 1, "three seeded samples came out identical"

    # response_format: vLLM's structured outputs constrain the random model to the schema.
    from vllm.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    want = ref(
        reference, PROMPTS[:1], max_tokens=12, temperature=0, structured_outputs=StructuredOutputsParams(json=schema)
    )
    done = client.completions.create(
        model=server.job,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
    )
    assert done.choices[0].text == want[0].outputs[0].text

    # logit_bias: a +100 bias on one token makes it the greedy choice at every position.
    token = reference.get_tokenizer().encode(" seven", add_special_tokens=False)[0]
    done = client.completions.create(
        model=server.job, prompt=PROMPTS[0], max_tokens=4, temperature=0, logit_bias={str(token): 100}, logprobs=0
    )
    assert done.choices[0].text == reference.get_tokenizer().decode([token] * 4)


@pytest.mark.parametrize(
    "change, param, text",
    [
        ({"temperature": -1}, "temperature", "temperature must be non-negative"),
        ({"max_tokens": "a"}, "max_tokens", "unable to parse string as an integer"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only be defined when `stream=True`"),
        ({"logprobs": 50}, "logprobs", "logprobs"),
        ({"best_of": 2}, "best_of", "unknown parameter(s): best_of"),  # vLLM 0.32's completions have no best_of
    ],
)
def test_a_parameter_vllm_rejects_gets_its_error_shape(server, change, param, text):
    """400 with vLLM's ErrorResponse body: message, type, param, code (what vLLM's own server answers)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    body = {"model": server.job, "prompt": "hi", "max_tokens": 4, **change}
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    error = ErrorResponse.model_validate(r.json()).error
    assert error.code == 400 and error.type in ("BadRequestError", "Bad Request")
    assert error.param.split(".")[-1] == param and text in error.message, error


def test_lm_eval_runs_generate_until_and_loglikelihood_tasks(server, model_dir, reference, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(DATA / "lm_eval"), include_defaults=False)
    args = (
        f"model={server.job},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={model_dir},num_concurrent=4,max_retries=1"
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(DATA.parents[1])  # the task files name their data relative to the repository root
    out = simple_evaluate(
        model="local-completions", model_args=args, tasks=["es_tiny_gen", "es_tiny_choice"], task_manager=tasks
    )
    gen = out["results"]["es_tiny_gen"]
    choice = out["results"]["es_tiny_choice"]

    # generate_until: exact match of each greedy answer, scored against the plain engine's answers.
    tok = reference.get_tokenizer()
    rows = [json.loads(line) for line in (DATA / "lm_eval" / "gen.jsonl").read_text().splitlines()]
    # lm-eval sends token ids it encoded without special tokens.
    prompts = [{"prompt_token_ids": tok.encode(r["question"], add_special_tokens=False)} for r in rows]
    greedy = ref(reference, prompts, max_tokens=8, temperature=0, stop=["\n"])
    matches = [g.outputs[0].text.strip() == r["answer"] for g, r in zip(greedy, rows, strict=True)]
    assert math.isclose(gen["exact_match,none"], sum(matches) / len(rows))

    # loglikelihood: the choice the plain engine's prompt logprobs rank first.
    rows = [json.loads(line) for line in (DATA / "lm_eval" / "choice.jsonl").read_text().splitlines()]
    correct = 0
    for r in rows:
        scores = []
        for c in r["choices"]:
            ctx = tok.encode(r["question"], add_special_tokens=False)
            full = tok.encode(r["question"] + " " + c, add_special_tokens=False)
            lp = ref(reference, [{"prompt_token_ids": full}], max_tokens=1, temperature=0, prompt_logprobs=0)[0]
            scores.append(sum(lp.prompt_logprobs[i][full[i]].logprob for i in range(len(ctx), len(full))))
        correct += max(range(len(scores)), key=scores.__getitem__) == r["label"]
    assert math.isclose(choice["acc,none"], correct / len(rows))


def test_200_concurrent_completions_half_streaming_are_all_correct(server, reference):
    prompts = [f"What is {i % 10} + {i % 7}?" for i in range(200)]
    outputs = ref(reference, prompts, max_tokens=6, temperature=0)
    expected = {p: o.outputs[0].text for p, o in zip(prompts, outputs, strict=True)}

    async def one(client, i):
        body = {"model": server.job, "prompt": prompts[i], "max_tokens": 6, "temperature": 0, "stream": i % 2 == 1}
        if not body["stream"]:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
        return text

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    texts = asyncio.run(main())
    wrong = [(i, t, expected[prompts[i]]) for i, t in enumerate(texts) if t != expected[prompts[i]]]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_takes_its_request_out_of_the_engine(server, stream):
    """Its tokens are never finished: the session ends with no completion tokens counted for it."""
    import time

    def counters():
        text = httpx.get(server.url + "/metrics", headers=AUTH).text
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("es_serve_completion_batches_total", "es_serve_completion_tokens_total"):
                values[name] = float(value)
        return values

    before = counters()
    body = {"model": server.job, "prompt": "one", "max_tokens": 480, "ignore_eos": True, "stream": stream}
    with httpx.Client(headers=AUTH, timeout=httpx.Timeout(60, read=0.5)) as c:
        if stream:
            with c.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert next(line for line in r.iter_lines() if line.startswith("data: "))
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post(server.url + "/v1/completions", json=body)
    deadline = time.time() + 120
    while counters()["es_serve_completion_batches_total"] == before["es_serve_completion_batches_total"]:
        assert time.time() < deadline, "the engine session never ended"
        time.sleep(0.1)
    # 480 tokens would have been counted had the request run to its end.
    after = counters()
    assert after["es_serve_completion_tokens_total"] == before["es_serve_completion_tokens_total"]


def test_while_a_job_trains_its_live_weights_answer_and_other_weights_get_409(server, client):
    """Training and serving share the engine: the training job's id streams from it, other weights wait."""
    import time

    config = {**server.config, "reward": {"fn": "slow.py:slow"}, "train": {"steps": 2, "eval_every": 2}}
    job = httpx.post(server.url + "/v1/jobs", headers=AUTH, json={"config": config}).json()
    deadline = time.time() + 300
    while httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=AUTH).json()["status"] != "running":
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.2)
    stream = client.completions.create(model=job["id"], prompt=PROMPTS[0], max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    with pytest.raises(openai.ConflictError) as busy:
        client.completions.create(model=server.job, prompt=PROMPTS[0], max_tokens=4)
    assert f"the engine is training {job['id']}" in busy.value.message
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "running"
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", headers=AUTH, timeout=600) as events:
        for _ in events.iter_lines():
            pass
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "succeeded"
