"""The dense engine's OpenAI subset: plain completions answered like transformers, the rest refused by name."""

import pytest
import torch
from fastapi.testclient import TestClient

from es_serve.server import ServerSettings, create_app


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ES_SERVE_CACHE", str(root / "cache"))
        from es_serve.models import resolve_model

        with TestClient(create_app(ServerSettings(runs=root / "runs", engine="dense"))) as client:
            yield client, resolve_model("tiny-llama")


def test_dense_greedy_completion_matches_transformers(dense):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from es_serve.engines.sizing import resolve_dtype

    client, model_dir = dense
    r = client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "one two", "max_tokens": 5, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, resolve_dtype("auto")))
    ids = torch.tensor([tok("one two", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert r.json()["choices"][0]["text"] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("extra", [{"stream": True}, {"logprobs": 1}, {"stop": ["x"]}, {"presence_penalty": 0.5}])
def test_dense_refuses_what_it_lacks_by_name(dense, extra):
    client, _ = dense
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "one", "max_tokens": 2, **extra})
    assert r.status_code == 400
    error = r.json()["error"]
    name = next(iter(extra))
    assert error["param"] == name and f"does not implement {name}" in error["message"]
