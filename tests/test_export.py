"""`es-serve export`: sharded safetensors through transformers, the model card, the Hub push."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters import Population, shape_fitness
from adapters.noise import NOISE_VERSION
from es_serve.config import Config
from es_serve.engines.dense import DenseEngine
from es_serve.export import export_run
from es_serve.run_dir import RunDir
from es_serve.types import Generation, Sampling

ROOT = Path(__file__).resolve().parents[1]
POP = Population(size=4, rank=2, sigma=0.2)
PROMPTS = ["What is 3 + 4?", "The answer is"]
GREEDY = Sampling(max_tokens=8)
# Held-out rewards per prompt at the first and last evaluation; the card must report
# gain = mean(last - first) = 2/5 = +0.400 and paired s.e. = sd([1, 0, 0, 0, 1]) / sqrt(5)
# = sqrt(0.3) / sqrt(5) = 0.245, worked out by hand.
FIRST, LAST = [0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from es_serve.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


def _updates():
    gens = [Generation(POP, seed=7, epoch=e) for e in (0, 1)]
    shaped = [
        shape_fitness(torch.randn(POP.size, 3, generator=torch.Generator().manual_seed(s)), "centered") for s in (1, 2)
    ]
    return list(zip(gens, shaped, strict=True))


def _run_dir(path: Path, model_dir: Path) -> RunDir:
    """A run directory as `es-serve train` leaves it after two steps (config, replay log, metrics)."""
    config = Config.model_validate(
        {
            "model": {"name": str(model_dir)},
            "es": {"population": POP.size, "rank": POP.rank, "sigma": POP.sigma, "lr": 0.5},
            "task": {"name": "arithmetic", "prompts_per_step": 3, "eval_prompts": 5},
            "reward": {"fn": "numeric"},
            "train": {"steps": 2, "eval_every": 2},
        }
    )
    run = RunDir(path)
    run.create(config)
    for step, (gen, shaped) in enumerate(_updates(), start=1):
        spec = {"size": POP.size, "rank": POP.rank, "sigma": POP.sigma, "antithetic": POP.antithetic}
        entry = {"step": step, "seed": gen.seed, "epoch": gen.epoch, "population": spec, "lr": 0.5}
        run.commit_step({**entry, "scaling": "mean", "shaped": [float(x) for x in shaped], "noise": NOISE_VERSION})
    run.log_metrics({"step": 0, "eval_reward": 0.4, "eval_per_prompt": FIRST})
    run.log_metrics({"step": 1, "reward_mean": 0.5})
    run.log_metrics({"step": 2, "reward_mean": 0.6, "eval_reward": 0.8, "eval_per_prompt": LAST})
    return run


def _greedy(model, tokenizer, prompts):
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def test_sharded_export_loads_in_transformers_with_the_trained_weights(qwen2_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _run_dir(tmp_path / "run", qwen2_dir)
    out = export_run(run.path, tmp_path / "out", max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 400_000 for s in shards)  # 300 KB plus the header

    # The dense reference of the trained weights: the base model plus both updates.
    dense = DenseEngine(qwen2_dir, dtype=torch.float64)
    base = {k: v.clone() for k, v in dense.master.items()}
    for gen, shaped in _updates():
        dense.apply_update(gen, shaped, lr=0.5)
    exported = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    with safe_open(str(qwen2_dir / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        if name in dense.master:
            assert torch.equal(exported[name], dense.master[name]), name
            assert not torch.equal(exported[name], base[name]), f"{name} was not trained"
        else:  # biases, norms, embeddings: bit for bit the base model's
            assert torch.equal(exported[name], value), name

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    want = [c.token_ids for c in dense.generate(PROMPTS, GREEDY)]
    assert _greedy(model, tokenizer, PROMPTS) == want
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(qwen2_dir)).chat_template


def test_model_card_reports_the_run(qwen2_dir, tmp_path):
    run = _run_dir(tmp_path / "run", qwen2_dir)
    card = (export_run(run.path, tmp_path / "out") / "README.md").read_text()
    assert card.startswith("---\n") and 'library_name: "transformers"' in card
    assert "base_model:" not in card and str(qwen2_dir) not in card  # a local directory is no Hub id
    for text in (
        f"| base model | {qwen2_dir.name} (a local directory) |",
        "| trained modules | q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj |",
        "| task | built-in task `arithmetic` |",
        "| reward | `numeric` |",
        "| steps | 2 (of 2 configured) |",
        "| population N | 4 (antithetic pairs) |",
        "| rank r | 2 |",
        "| sigma | 0.2 |",
        "| learning rate | 0.5 (mean scaling) |",
        "| fitness shaping | centered |",
        "0.400 at step 0, 0.800 at step 2",
        "**Gain: +0.400 ± 0.245**",
        "over the same 5 prompts",
    ):
        assert text in card, text


def test_card_names_the_hub_base_model():
    from es_serve.model_card import base_model_id

    assert base_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_model_id("/models/mine") is None


def _cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("es-serve: error:")]


def test_push_to_hub_offline_and_unreachable(qwen2_dir, tmp_path):
    import os

    run = _run_dir(tmp_path / "run", qwen2_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    offline = _cli("export", str(run.path), str(tmp_path / "a"), "--push-to-hub", "me/tiny-es", env=env)
    assert offline.returncode == 2, offline.stderr
    assert "--push-to-hub me/tiny-es" in offline.stderr and "HF_HUB_OFFLINE" in offline.stderr
    assert len(_errors(offline.stderr)) == 1 and "Traceback" not in offline.stderr
    assert not (tmp_path / "a").exists()

    # Online, but nothing answers at the Hub address: the export stays on disk, one message says why.
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_test")
    refused = _cli("export", str(run.path), str(tmp_path / "b"), "--push-to-hub", "me/tiny-es", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "could not push" in refused.stderr and "hf upload me/tiny-es" in refused.stderr
    assert len(_errors(refused.stderr)) == 1 and "Traceback" not in refused.stderr
    assert (tmp_path / "b" / "README.md").is_file()


def test_bad_shard_size_is_refused(qwen2_dir, tmp_path):
    run = _run_dir(tmp_path / "run", qwen2_dir)
    with pytest.raises(ValueError, match="--max-shard-size 'lots'"):
        export_run(run.path, tmp_path / "out", max_shard_size="lots")


def test_export_keeps_the_base_models_dtype(qwen2_dir, tmp_path):
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from es_serve.export import trained_weights

    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(qwen2_dir), dtype=torch.bfloat16).save_pretrained(str(bf16_dir))
    for item in qwen2_dir.glob("tokenizer*"):
        shutil.copy2(item, bf16_dir / item.name)
    run = _run_dir(tmp_path / "run", bf16_dir)
    out = export_run(run.path, tmp_path / "out")
    _, trained = trained_weights(run, bf16_dir, run_config_modules(run))
    with (
        safe_open(str(out / "model.safetensors"), "pt") as f,
        safe_open(str(bf16_dir / "model.safetensors"), "pt") as b,
    ):
        for name in b.keys():  # noqa: SIM118
            got = f.get_tensor(name)
            assert got.dtype == torch.bfloat16, name
            want = trained[name].to(torch.bfloat16) if name in trained else b.get_tensor(name)
            assert torch.equal(got, want), name


def run_config_modules(run):
    from es_serve.config import load_config

    return load_config(run.config_path).es.modules
