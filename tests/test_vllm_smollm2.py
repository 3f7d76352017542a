"""The vLLM engine on the bundled SmolLM2-135M-Instruct against the dense float64 reference."""

import pytest
import torch

from adapters import Population, shape_fitness
from es_serve.engines.dense import DenseEngine
from es_serve.types import Generation, Sampling

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

GREEDY = Sampling(max_tokens=12)
POP = Population(size=8, rank=1, sigma=0.02)


@pytest.fixture(scope="module")
def smollm2():
    from es_serve.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def engines(smollm2):
    from es_serve.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(smollm2, POP, 2, GREEDY.max_tokens, dtype="float32", memory_fraction=0.2)
    dense = DenseEngine(smollm2, dtype=torch.float64)
    prompts = [
        dense.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("What is 2+3?", "Name a colour.")
    ]
    yield engine, dense, prompts
    engine.close()


def test_base_model_answers_and_matches_dense(engines):
    engine, dense, prompts = engines
    out = engine.generate(prompts, GREEDY)
    assert "5" in out[0].text
    assert [c.token_ids for c in out] == [c.token_ids for c in dense.generate(prompts, GREEDY)]


def test_members_match_dense_members_and_differ_from_base(engines):
    engine, dense, prompts = engines
    gen = Generation(POP, seed=0, epoch=0)
    result = engine.generate_population(gen, prompts, GREEDY)
    base = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    # The first and the last antithetic pair (slots at both ends of vLLM's stack): each float64 member
    # rebuilds the whole model's W + E, seconds apiece; every member is checked on the tiny model.
    checked = (0, 1, POP.size - 2, POP.size - 1)
    differ = 0
    for i in checked:
        got = [c.token_ids for c in result.completions[i]]
        assert got == [c.token_ids for c in dense.generate(prompts, GREEDY, gen, i)], f"member {i}"
        differ += got != base
    assert differ >= len(checked) // 2


def test_merge_matches_dense(engines):
    engine, dense, prompts = engines
    gen = Generation(POP, seed=0, epoch=0)
    shaped = shape_fitness(torch.arange(8.0), "rank")
    engine.apply_update(gen, shaped, lr=0.05)
    dense.apply_update(gen, shaped, lr=0.05)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == [
        c.token_ids for c in dense.generate(prompts, GREEDY)
    ]
