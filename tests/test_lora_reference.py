"""A member's LoRA adapter and the dense W + E_i model are the same function."""

import pytest
import torch

from adapters import Population, member_lora, write_peft_adapter
from es_serve.engines.dense import DenseEngine
from es_serve.types import Generation, Sampling


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return DenseEngine(tiny_model_dir, dtype=torch.float64)


GEN = Generation(Population(size=4, rank=2, sigma=0.05), seed=3, epoch=1)


def test_lora_matmul_equals_dense_perturbation_per_layer(dense):
    x = torch.randn(5, 256, dtype=torch.float64)
    for t in dense.targets:
        w = dense.master[t.param].double()
        lora_a, lora_b = member_lora(GEN.population, 3, t, GEN.seed, GEN.epoch)
        x_in = x[:, : t.in_features]
        lora_out = x_in @ w.T + x_in @ lora_a.double().T @ lora_b.double().T
        with dense.perturbed(GEN, 3):
            dense_out = x_in @ dense.params[t.param].T
        # The reference builds E_i from the float32 noise factors, the adapter from float32 tensors
        # with sqrt(sigma) folded in: they agree to float32 rounding, far below a scaling error.
        torch.testing.assert_close(lora_out, dense_out, rtol=0, atol=1e-6)


def test_peft_adapter_gives_dense_member_logits(dense, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = dense.encode("What is 12 + 30? The answer is")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    base_logits = dense.logits(ids)
    for member in range(GEN.population.size):
        path = write_peft_adapter(tmp_path / f"m{member}", GEN.population, member, dense.targets, GEN.seed, GEN.epoch)
        peft_model = PeftModel.from_pretrained(base, str(path), adapter_name=f"m{member}")
        with torch.no_grad():
            peft_logits = peft_model(torch.tensor([ids])).logits[0]
        dense_logits = dense.logits(ids, GEN, member)
        torch.testing.assert_close(peft_logits, dense_logits, rtol=0, atol=2e-5)  # float32 adapter rounding
        # The perturbation is large enough to matter, or this comparison would prove nothing.
        assert (dense_logits - base_logits).abs().max() > 1e-2
        base = peft_model.unload()


def test_dense_engine_restores_weights_after_a_member(dense):
    before = {k: v.detach().clone() for k, v in dense.params.items()}
    with dense.perturbed(GEN, 1):
        pass
    for k, v in dense.params.items():
        assert torch.equal(v, before[k]), k


def test_members_generate_differently_and_greedy_is_deterministic(dense):
    sampling = Sampling(max_tokens=8)
    gen = Generation(Population(size=4, rank=1, sigma=0.5), seed=0, epoch=0)
    result = dense.generate_population(gen, ["What is 1 + 2?", "The answer is"], sampling)
    assert len(result.completions) == 4 and all(len(row) == 2 for row in result.completions)
    assert len({tuple(row[0].token_ids) for row in result.completions}) > 1
    again = dense.generate(["What is 1 + 2?"], sampling, gen, 2)
    assert again[0].token_ids == result.completions[2][0].token_ids
