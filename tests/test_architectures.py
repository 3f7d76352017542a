"""Every supported decoder architecture through the vLLM engine, against the dense float64 reference.

One engine start per architecture (a module-scoped fixture parametrized by architecture); the tiny
Llama has its own, longer suite in test_vllm_engine.py. Each tiny model has random biases and norm
weights, so a reload that dropped or reset any untrained tensor would change the greedy tokens.
"""

import pytest
import torch

from adapters import Population, shape_fitness
from adapters.noise import NOISE_VERSION
from es_serve.engines.dense import DenseEngine
from es_serve.types import Generation, Sampling

pytestmark = pytest.mark.vllm

ARCHITECTURES = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
PROMPTS = ["What is 3 + 4?", "The answer is", "how many numbers"]
GREEDY = Sampling(max_tokens=8)
# Rank 2, so that a LoRA scaled by sigma / r instead of sigma / sqrt(r) would give other tokens.
POP = Population(size=8, rank=2, sigma=0.3)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory):
    from es_serve.engines.vllm_engine import VLLMEngine
    from es_serve.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    # float32 in vLLM so greedy tokens can be compared exactly with the float64 reference.
    engine = VLLMEngine(path, POP, len(PROMPTS), GREEDY.max_tokens, dtype="float32", memory_fraction=0.15)
    yield request.param, path, engine, DenseEngine(path, dtype=torch.float64)
    engine.close()


def _vectors(worker):
    """vLLM's live 1-D tensors (biases, norm weights), by name; what a merge must leave alone."""
    return {n: t.detach().clone() for n, t in worker.model_runner.model.named_parameters() if t.dim() == 1}


def _tokens(rows):
    return [[c.token_ids for c in row] for row in rows]


def _dense_members(dense, gen, members):
    return [[c.token_ids for c in dense.generate(PROMPTS, GREEDY, gen, i)] for i in members]


def test_members_match_the_dense_reference(arch):
    name, _, engine, dense = arch
    gen = Generation(POP, seed=5, epoch=0)
    got = _tokens(engine.generate_population(gen, PROMPTS, GREEDY).completions)
    # The path that really served the members: the compiled kernel in float32, no fallback call.
    assert engine.lora_kernel == "es-c-f32", engine.kernel_report()
    assert got == _dense_members(dense, gen, range(POP.size)), name
    base = [c.token_ids for c in dense.generate(PROMPTS, GREEDY)]
    assert sum(row != base for row in got) >= POP.size // 2, "members barely differ from the base model"


def test_merge_matches_dense_keeps_untrained_tensors_and_exports(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from es_serve.config import Config
    from es_serve.export import export_run
    from es_serve.run_dir import RunDir

    name, path, engine, dense = arch
    gen = Generation(POP, seed=9, epoch=1)
    shaped = shape_fitness(torch.randn(POP.size, 3, generator=torch.Generator().manual_seed(1)), "centered")
    before = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    vectors = engine.llm.collective_rpc(_vectors)[0]
    engine.apply_update(gen, shaped, lr=1.0)
    after = engine.llm.collective_rpc(_vectors)[0]
    assert vectors.keys() == after.keys() and all(torch.equal(vectors[k], after[k]) for k in vectors), name
    if name == "qwen2":
        assert sum(k.endswith("qkv_proj.base_layer.bias") for k in after) == 2, sorted(after)
    dense.apply_update(gen, shaped, lr=1.0)
    for param, w in engine.state_dict().items():
        torch.testing.assert_close(w, dense.master[param], rtol=0, atol=0)
    merged = [c.token_ids for c in dense.generate(PROMPTS, GREEDY)]
    assert merged != before, "the update did not change the greedy tokens"
    # Biases, norms and embeddings come from the checkpoint in the dense model; a reload that lost
    # any of them in vLLM would answer differently.
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == merged, name
    again = engine.generate_members([(gen, i) for i in range(4)], PROMPTS, GREEDY)
    assert _tokens(again.completions) == _dense_members(dense, gen, range(4)), name

    # Export: the replay log of this one update, rebuilt on the base checkpoint and saved through
    # transformers, answers greedily as the merged engine and the dense reference do.
    run = RunDir(tmp_path / "run")
    run.create(Config.model_validate({"model": {"name": str(path)}, "es": {"population": POP.size, "rank": POP.rank}}))
    spec = {"size": POP.size, "rank": POP.rank, "sigma": POP.sigma, "antithetic": POP.antithetic}
    run.commit_step(
        {
            "step": 1,
            "seed": 9,
            "epoch": 1,
            "population": spec,
            "lr": 1.0,
            "scaling": "mean",
            "shaped": shaped.tolist(),
            "noise": NOISE_VERSION,
        }
    )
    out = export_run(run.path, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    exported = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        exported.append(tokens[0, ids.shape[1] :].tolist())
    assert exported == merged, name
