"""Target names across architectures, unsupported models, Hub ids offline, and the independent reference."""

import json
import math

import pytest
import torch

import adapters.lora
from adapters import NoiseKey, Population, Target, find_targets, member_lora, pair_factors
from es_serve.engines.dense import reference_delta
from es_serve.models import SUPPORTED_ARCHITECTURES, resolve_model

HIDDEN, Q, KV, INTER = 128, 128, 64, 256


def _phi3_state(layers=2):
    """Phi-3's checkpoint layout: q/k/v and gate/up stored fused."""
    state = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.zeros(Q + 2 * KV, HIDDEN)
        state[p + "self_attn.o_proj.weight"] = torch.zeros(HIDDEN, Q)
        state[p + "mlp.gate_up_proj.weight"] = torch.zeros(2 * INTER, HIDDEN)
        state[p + "mlp.down_proj.weight"] = torch.zeros(HIDDEN, INTER)
        state[p + "input_layernorm.weight"] = torch.zeros(HIDDEN)
    return state


def test_split_names_resolve_to_a_checkpoint_fused_matrix():
    targets = find_targets(_phi3_state())
    assert [(t.layer, t.module, t.out_features, t.in_features) for t in targets[:4]] == [
        (0, "qkv_proj", Q + 2 * KV, HIDDEN),
        (0, "o_proj", HIDDEN, Q),
        (0, "gate_up_proj", 2 * INTER, HIDDEN),
        (0, "down_proj", HIDDEN, INTER),
    ]
    assert len(targets) == 8
    # The fused name itself is accepted too, and gives the same targets.
    assert find_targets(_phi3_state(), ["qkv_proj"]) == find_targets(_phi3_state(), ["q_proj", "k_proj", "v_proj"])


def test_part_of_a_fused_matrix_is_refused_with_the_way_out():
    with pytest.raises(ValueError) as err:
        find_targets(_phi3_state(), ["q_proj", "v_proj"])
    message = str(err.value)
    assert "k_proj" in message and "qkv_proj" in message and "name all of q_proj, k_proj, v_proj" in message


def test_unknown_module_lists_what_the_model_has():
    with pytest.raises(ValueError) as err:
        find_targets(_phi3_state(), ["q_proj", "k_proj", "v_proj", "w1"])
    assert "['w1'] not found" in str(err.value)
    assert "down_proj, gate_up_proj, o_proj, qkv_proj" in str(err.value)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError) as err:
        resolve_model(str(tmp_path))
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    assert all(a in message for a in SUPPORTED_ARCHITECTURES)
    assert {"Qwen2ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)


def test_hub_id_offline_names_the_id_and_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(ValueError) as err:
        resolve_model("someone/some-model")
    message = str(err.value)
    assert "'someone/some-model'" in message and "offline" in message
    assert "HF_HUB_OFFLINE=0" in message and "hf download someone/some-model" in message


def _hand_delta(member, target, seed, epoch, pop):
    """E_i from the EGGROLL formula, written out here without the package's helpers."""
    key = NoiseKey(seed, epoch, member // 2, target.layer, target.module)
    a, b = pair_factors(key, target.out_features, target.in_features, pop.rank)
    sign = 1.0 if member % 2 == 0 else -1.0
    return sign * pop.sigma / math.sqrt(pop.rank) * (a.double() @ b.double().T)


TARGETS = [Target(0, "q_proj", 24, 16, "model.layers.0.self_attn.q_proj.weight"), Target(1, "down_proj", 16, 40, "x")]
POP = Population(size=6, rank=4, sigma=0.05)


def test_reference_and_adapters_agree_with_the_formula():
    for t in TARGETS:
        for i in range(POP.size):
            want = _hand_delta(i, t, 3, 2, POP)
            torch.testing.assert_close(reference_delta(POP, i, t, 3, 2), want, rtol=0, atol=0)
            lora_a, lora_b = member_lora(POP, i, t, 3, 2)
            torch.testing.assert_close(lora_b.double() @ lora_a.double(), want, rtol=1e-5, atol=1e-8)


def test_a_wrong_lora_scaling_is_caught(monkeypatch):
    def sigma_over_r(a, b, sign, sigma):  # sigma / r instead of sigma / sqrt(r): equal only at r = 1
        rank = a.shape[-1]
        return (math.sqrt(sigma) * b.T).contiguous(), (sign * math.sqrt(sigma) / rank * a).contiguous()

    monkeypatch.setattr(adapters.lora, "lora_from_factors", sigma_over_r)
    t = TARGETS[0]
    lora_a, lora_b = member_lora(POP, 1, t, 3, 2)
    # The dense reference does not go through the adapter code, so it keeps the right scale.
    ratio = (lora_b.double() @ lora_a.double()).norm() / reference_delta(POP, 1, t, 3, 2).norm()
    assert ratio == pytest.approx(0.5, rel=1e-6)  # sqrt(4) / 4


def test_hub_id_in_the_local_cache_resolves_offline(monkeypatch, tmp_path):
    import shutil

    from es_serve.tiny_model import build_tiny_model

    # The Hub cache's own layout: models--owner--name/{refs/main, snapshots/<revision>/...}.
    repo = tmp_path / "hub" / "models--someone--tiny-qwen3"
    snapshot = repo / "snapshots" / "0123abcd"
    build_tiny_model(tmp_path / "built", "qwen3")
    shutil.copytree(tmp_path / "built", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("someone/tiny-qwen3") == snapshot
    # An architecture outside the tested list is refused even when it comes from the Hub.
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="MambaForCausalLM; es-serve supports"):
        resolve_model("someone/tiny-qwen3")
