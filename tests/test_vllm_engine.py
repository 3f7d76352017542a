"""The vLLM engine against the dense float64 reference, on the tiny random Llama."""

import pytest
import torch

from adapters import Population, shape_fitness
from es_serve.engines.base import Engine
from es_serve.engines.dense import DenseEngine
from es_serve.types import Generation, Sampling

pytestmark = pytest.mark.vllm

PROMPTS = ["What is 3 + 4?", "The answer is", "how many numbers", "use each once"]
GREEDY = Sampling(max_tokens=10)
POP = Population(size=32, rank=1, sigma=0.3)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    from es_serve.engines.vllm_engine import VLLMEngine

    # float32 in vLLM so greedy tokens can be compared exactly with the float64 reference.
    engine = VLLMEngine(tiny_model_dir, POP, len(PROMPTS), GREEDY.max_tokens, dtype="float32", memory_fraction=0.15)
    yield engine, DenseEngine(tiny_model_dir, dtype=torch.float64)
    engine.close()


# First in this file on purpose: its engine is closed before the module's float32 engine starts, as
# vLLM's CPU worker sizes its KV cache against the whole process's memory.
@pytest.mark.parametrize("fused", [False, True], ids=["vllm-gemm", "fused-gemm"])
def test_auto_dtype_members_match_the_float64_reference(tiny_model_dir, fused, monkeypatch):
    """The machine's own dtype (bfloat16 where the CPU has native bf16) through the member kernel.

    Greedy tokens cannot be compared exactly: bf16 rounding flips near-ties. What must hold is that
    every member's next-token log-probabilities agree with the float64 member far better than they
    agree with any other model: the error from bf16 is a small fraction of what the member's own
    perturbation moves (a missing, misplaced or mis-scaled LoRA term is as large as that), and vLLM's
    greedy choice is the float64 argmax or within the bf16 error of it.
    """
    from es_serve.engines import member_gemm
    from es_serve.engines.sizing import resolve_dtype
    from es_serve.engines.vllm_engine import VLLMEngine

    if fused and not member_gemm.supported():
        pytest.skip("no AMX bf16 on this CPU: the fused GEMM is not built")
    if fused:
        monkeypatch.setenv(member_gemm.ENV, "1")
    else:
        monkeypatch.delenv(member_gemm.ENV, raising=False)
    members = 8
    pop = Population(size=members, rank=1, sigma=0.3)
    engine = VLLMEngine(tiny_model_dir, pop, len(PROMPTS), 1, dtype="auto", memory_fraction=0.1)
    try:
        assert engine.dtype == resolve_dtype("auto")
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest  # noqa: F401  (engine._lora builds them)

        gen = Generation(pop, seed=5, epoch=0)
        top = 20
        requests, loras = [], []
        for i in range(members):
            for p in PROMPTS:
                requests.append({"prompt_token_ids": engine.encode(p)})
                loras.append(engine._lora(gen, i))
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top)
        # Put into slots as the trainer does, so each antithetic pair's rows are read once for both.
        engine._rpc("es_prepare", [(lora.lora_path, lora.lora_int_id) for lora in loras[:: len(PROMPTS)]])
        outputs = engine.llm.generate(requests, params, lora_request=loras, use_tqdm=False)
        kernel = engine.lora_kernel
        report = engine.kernel_report()
        engine._rpc("es_prepare", [])  # withdraws the pair claim: every slot reads its own rows
        own_rows = engine.llm.generate(requests, params, lora_request=loras, use_tqdm=False)
        after = engine.kernel_report()
        # The bench's stock baseline gives the layers vLLM's GEMM back, and "es" the fused one again.
        engine.use_kernel("vllm")
        switched = engine.kernel_report()["gemm"]
        engine.use_kernel("es")
        back = engine.kernel_report()["gemm"]
    finally:
        engine.close()
    name = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[engine.dtype]
    assert kernel == f"es-c-{name}", report
    assert report["fallback_calls"] == {}
    # Asked for on a CPU with AMX, bfloat16 runs the trained layers on the fused GEMM, the member term in its
    # epilogue; otherwise on vLLM's GEMM with the member kernel after it.
    if fused and engine.dtype == "bfloat16":
        assert report["gemm"] == "es-amx-bf16" and report["fused_calls"] > 0 and not report["gemm_calls_stock"], report
        assert (switched, back) == ("vllm", "es-amx-bf16")
    else:
        assert report["gemm"] == "vllm" and report["fused_calls"] == 0, report
        assert (switched, back) == ("vllm", "vllm")
    assert report["paired_calls"] > 0 and after["paired_calls"] == report["paired_calls"]
    # Reading a pair's rows once gives each member its own bits: identical log-probabilities.
    for shared, own in zip(outputs, own_rows, strict=True):
        assert {t: lp.logprob for t, lp in shared.outputs[0].logprobs[0].items()} == {
            t: lp.logprob for t, lp in own.outputs[0].logprobs[0].items()
        }

    dense = DenseEngine(tiny_model_dir, dtype=torch.float64)
    errors, moves = [], []
    for k, out in enumerate(outputs):
        i, p = divmod(k, len(PROMPTS))
        ids = engine.encode(PROMPTS[p])
        member = torch.log_softmax(dense.logits(ids, gen, i)[-1], -1)
        base = torch.log_softmax(dense.logits(ids)[-1], -1)
        got = out.outputs[0].logprobs[0]
        tokens = torch.tensor(sorted(got))
        vllm_lp = torch.tensor([got[t].logprob for t in sorted(got)], dtype=torch.float64)
        errors.append((vllm_lp - member[tokens]).abs().max().item())
        moves.append((member - base).abs().max().item())
        chosen = out.outputs[0].token_ids[0]
        # The greedy pick is the exact argmax, or a near-tie within this request's own bf16 error.
        assert member[chosen] >= member.max() - 2 * errors[-1] - 1e-6
    # sigma 0.3 moves the log-probabilities by O(1); bf16 (u = 2^-8) through two small layers must
    # stay an order of magnitude below that, here and for every request.
    assert min(moves) > 0.3, moves
    assert max(e / m for e, m in zip(errors, moves, strict=True)) < 0.1, (errors, moves)


def test_fused_gemm_comes_with_the_switch_to_es_and_serves_merged_weights(tiny_model_dir, monkeypatch):
    """An engine started on vLLM's ops gets the fused GEMM when switched to "es", and after a merge it
    computes with the merged weights: pure log-probabilities against the float64 dense model merged the
    same way, and against vLLM's own GEMM on the same engine."""
    from es_serve.engines import member_gemm
    from es_serve.engines.vllm_engine import VLLMEngine

    if not member_gemm.supported():
        pytest.skip("no AMX bf16 on this CPU: the fused GEMM is not built")
    monkeypatch.setenv(member_gemm.ENV, "1")
    pop = Population(size=8, rank=1, sigma=0.3)
    gen, fitness, lr = Generation(pop, seed=3, epoch=0), [1.0, -1.0, 0.5, -0.5, 0.0, 1.0, -1.0, 0.0], 0.5
    engine = VLLMEngine(tiny_model_dir, pop, len(PROMPTS), 1, dtype="bfloat16", memory_fraction=0.1, lora_kernel="vllm")
    try:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        requests = [{"prompt_token_ids": engine.encode(p)} for p in PROMPTS]
        started = engine.kernel_report()["gemm"]
        engine.use_kernel("es")
        switched = engine.kernel_report()["gemm"]
        engine.apply_update(gen, fitness, lr)
        fused = engine.llm.generate(requests, params, use_tqdm=False)
        report = engine.kernel_report()
        engine.use_kernel("vllm")
        stock = engine.llm.generate(requests, params, use_tqdm=False)
        after = engine.kernel_report()
    finally:
        engine.close()
    assert (started, switched) == ("vllm", "es-amx-bf16")
    assert report["gemm_calls_plain"] > 0 and not report["gemm_calls_stock"], report
    # The merge packed the fused GEMM's weights only; vLLM's GEMM was rebuilt on the merged weights when
    # the switch needed it, once per trained layer.
    layers = report["gemm_layers"]
    assert layers > 0 and report["gemm_stock_stale"] == layers and report["gemm_stock_rebuilds"] == 0, report
    assert after["gemm_stock_stale"] == 0 and after["gemm_stock_rebuilds"] == layers, after
    merged, base = DenseEngine(tiny_model_dir, dtype=torch.float64), DenseEngine(tiny_model_dir, dtype=torch.float64)
    merged.apply_update(gen, fitness, lr)
    for p, out, ref in zip(PROMPTS, fused, stock, strict=True):
        ids = merged.encode(p)
        want = torch.log_softmax(merged.logits(ids)[-1], -1)
        before = torch.log_softmax(base.logits(ids)[-1], -1)
        got = out.outputs[0].logprobs[0]
        tokens = sorted(got)
        lp = torch.tensor([got[t].logprob for t in tokens], dtype=torch.float64)
        error = (lp - want[tokens]).abs().max().item()
        move = (want - before).abs().max().item()
        # The merge moves log-probabilities far more than bf16 errs: stale weights would fail here.
        assert move > 0.1 and error < 0.1 * move, (error, move)
        # vLLM's own GEMM on the same merged engine agrees to the same precision.
        stock_lp = {t: lp.logprob for t, lp in ref.outputs[0].logprobs[0].items()}
        common = [t for t in tokens if t in stock_lp]
        assert max(abs(got[t].logprob - stock_lp[t]) for t in common) < 0.1 * move


def _tokens(rows):
    return [[c.token_ids for c in row] for row in rows]


def _dense_population(dense, gen, members, prompts, sampling=GREEDY):
    return [[c.token_ids for c in dense.generate(prompts, sampling, gen, i)] for i in members]


def test_whole_population_in_one_generate_call_matches_dense_members(engines, monkeypatch):
    engine, dense = engines
    calls = []
    original = engine.llm.generate
    monkeypatch.setattr(engine.llm, "generate", lambda *a, **k: calls.append(len(a[0])) or original(*a, **k))
    gen = Generation(POP, seed=11, epoch=0)
    result = engine.generate_population(gen, PROMPTS, GREEDY)
    assert calls == [32 * 4]
    assert len(result.completions) == 32 and all(len(row) == 4 for row in result.completions)
    assert _tokens(result.completions) == _dense_population(dense, gen, range(32), PROMPTS)
    base = [c.token_ids for c in dense.generate(PROMPTS, GREEDY)]
    # sigma is large enough that members really differ from the base model and from each other.
    assert sum(row != base for row in _tokens(result.completions)) >= 24
    assert len({tuple(map(tuple, row)) for row in _tokens(result.completions)}) >= 24


def test_unperturbed_generation_matches_dense(engines):
    assert all(isinstance(e, Engine) for e in engines), "an engine lacks part of es_serve.engines.base.Engine"
    engine, dense = engines
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == [
        c.token_ids for c in dense.generate(PROMPTS, GREEDY)
    ]


def test_member_result_does_not_depend_on_its_batch(engines):
    engine, _ = engines
    gen_a, gen_b = Generation(POP, seed=1, epoch=0), Generation(POP, seed=2, epoch=5)
    sampled = Sampling(max_tokens=10, temperature=1.0, seed=3)
    for sampling in (GREEDY, sampled):
        alone = engine.generate_members([(gen_a, 5)], PROMPTS, sampling).completions[0]
        crowd = [(gen_b, i) for i in range(12)] + [(gen_a, 5)] + [(gen_b, i) for i in range(12, 20)]
        mixed = engine.generate_members(crowd, PROMPTS, sampling).completions[12]
        assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]


def test_sampled_members_differ_by_seed(engines):
    engine, _ = engines
    gen = Generation(POP, seed=1, epoch=0)
    a = engine.generate_members([(gen, 0)], PROMPTS, Sampling(max_tokens=10, temperature=1.0, seed=1))
    b = engine.generate_members([(gen, 0)], PROMPTS, Sampling(max_tokens=10, temperature=1.0, seed=2))
    assert _tokens(a.completions) != _tokens(b.completions)


def test_merge_matches_dense_reference_and_next_generation_sees_it(engines):
    engine, dense = engines
    before = engine.checksum()
    gen = Generation(POP, seed=4, epoch=0)
    shaped = shape_fitness(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), "centered")
    # On CPU a merge repacks the touched layers directly instead of going through vLLM's reload.
    assert engine.weight_push == "direct"
    engine.apply_update(gen, shaped, lr=0.5)
    dense.apply_update(gen, shaped, lr=0.5)
    assert engine.checksum() != before
    weights = engine.state_dict()
    for name, w in weights.items():
        torch.testing.assert_close(w, dense.master[name], rtol=0, atol=0)
    merged_base = [c.token_ids for c in dense.generate(PROMPTS, GREEDY)]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == merged_base
    # The same adapters (same noise epoch) now ride on the merged weights.
    again = engine.generate_members([(gen, i) for i in range(6)], PROMPTS, GREEDY)
    assert _tokens(again.completions) == _dense_population(dense, gen, range(6), PROMPTS)


def _worker(engine):
    return engine.llm.llm_engine.model_executor.driver_worker.worker


def test_merge_through_vllms_reload_matches_dense_too(engines, monkeypatch):
    """The path every non-CPU or quantized engine takes: vLLM's own layerwise reload."""
    engine, dense = engines
    monkeypatch.setattr(_worker(engine), "_es_direct", None)
    assert engine.weight_push == "reload"
    gen = Generation(POP, seed=6, epoch=1)
    shaped = shape_fitness(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), "centered")
    engine.apply_update(gen, shaped, lr=0.5)
    dense.apply_update(gen, shaped, lr=0.5)
    for name, w in engine.state_dict().items():
        torch.testing.assert_close(w, dense.master[name], rtol=0, atol=0)
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == [
        c.token_ids for c in dense.generate(PROMPTS, GREEDY)
    ]
    again = engine.generate_members([(gen, i) for i in range(4)], PROMPTS, GREEDY)
    assert _tokens(again.completions) == _dense_population(dense, gen, range(4), PROMPTS)


def test_members_go_into_slots_once_and_engine_steps_skip_adapter_activation(engines, monkeypatch):
    from es_serve.engines.vllm_engine import SLOT_IDS

    engine, dense = engines
    worker = _worker(engine)
    manager = worker.model_runner.lora_manager
    loads, activations, written = [], [], []
    load, activate, write = manager._load_adapter, manager._es_original_apply, worker._es_write_members
    monkeypatch.setattr(manager, "_load_adapter", lambda request: loads.append(request.lora_int_id) or load(request))
    monkeypatch.setattr(manager, "_es_original_apply", lambda requests: activations.append(1) or activate(requests))
    monkeypatch.setattr(worker, "_es_write_members", lambda members: written.append(len(members)) or write(members))
    first = Generation(POP, seed=31, epoch=0)
    result = engine.generate_population(first, PROMPTS, GREEDY)
    loaded_first, written_first = len(loads), sum(written)
    # All 32 members were put into slots before the generate: loaded by vLLM (ids it had not seen) or
    # written in place (ids an earlier batch left in the slots), each once; none of the generate's
    # engine steps went through vLLM's per-adapter activation.
    assert sorted(loads) == sorted(set(loads)) and loaded_first + written_first == 32
    assert activations == []
    assert _tokens(result.completions[:6]) == _dense_population(dense, first, range(6), PROMPTS)
    # The next generation's members take the same ids: written in place, nothing registered with vLLM.
    second = Generation(POP, seed=31, epoch=1)
    handed_out = len(engine._lora_ids)
    result = engine.generate_population(second, PROMPTS, GREEDY)
    assert len(engine._lora_ids) == handed_out  # the table of per-member ids does not grow with generations
    assert len(loads) == loaded_first and sum(written) == written_first + 32 and activations == []
    counts = engine.kernel_report()["slot_members"]
    assert counts["written_in_place"] >= 32 and counts["reloaded_by_vllm"] == 0
    assert _tokens(result.completions[26:]) == _dense_population(dense, second, range(26, 32), PROMPTS)
    # An adapter not in a slot still takes vLLM's path, loaded and activated (here: one new member
    # served alone), and evicts one of the batch's ids from its slot.
    engine.generate(PROMPTS[:1], GREEDY, Generation(POP, seed=32, epoch=0), 3)
    assert len(loads) == loaded_first + 1
    evicted = [k for k in range(32) if SLOT_IDS + k not in manager._adapter_manager._active_adapters]
    assert len(evicted) == 1
    # The same generation again: the evicted id is loaded anew (vLLM dropped it from its registry too) or,
    # were it still registered, activated from there with an older member and written over; either way
    # once, and the rest of the slots are left as they are.
    result = engine.generate_population(second, PROMPTS, GREEDY)
    assert len(loads) + sum(written) == loaded_first + written_first + 32 + 1 + 1
    assert _tokens([result.completions[evicted[0]]]) == _dense_population(dense, second, evicted, PROMPTS)


def test_a_request_with_its_own_cache_salt_reuses_no_cached_prompt(engines):
    engine, _ = engines
    prompt = " ".join(f"word{k}" for k in range(60))
    # Two full KV blocks even with the CPU backend's 128 tokens, and room for the completion.
    assert 256 <= len(engine.encode(prompt)) <= 500
    shared = [engine.generate([prompt], GREEDY) for _ in range(2)]
    shared_hits = engine.last_cached_tokens
    salted = [engine.generate([prompt], GREEDY, share_prefixes=False) for _ in range(2)]
    assert shared_hits >= 128 and engine.last_cached_tokens == 0
    assert [c.token_ids for c in salted[1]] == [c.token_ids for c in shared[0]]


def test_load_state_dict_round_trip(engines):
    engine, dense = engines
    saved = engine.state_dict()
    checksum = engine.checksum()
    zeroed = {k: torch.zeros_like(v) for k, v in saved.items()}
    engine.load_state_dict(zeroed)
    assert engine.checksum() != checksum
    assert engine.load_state_dict(saved) == checksum
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == [
        c.token_ids for c in dense.generate(PROMPTS, GREEDY)
    ]


def test_member_kernel_serves_the_members(engines):
    engine, _ = engines
    # The population tests above ran through it; anything else here would mean a silent fallback.
    assert engine.lora_kernel == "es-c-f32"
    report = engine.kernel_report()
    assert report["fallback_calls"] == {} and report["fast_calls"]["f32"] > 0
    assert report["paired_calls"] > 0  # antithetic pairs read their rows once (tokens equal dense's above)


def test_plain_requests_in_a_member_batch_stay_unperturbed(engines):
    engine, dense = engines
    gen = Generation(POP, seed=23, epoch=0)
    members = [engine._lora(gen, i) for i in range(len(PROMPTS))]
    engine._rpc("es_prepare", [(m.lora_path, m.lora_int_id) for m in members])  # as every engine path does
    # Plain and member requests interleaved in one batch: vLLM marks the plain requests' tokens with
    # slot -1, which the member kernel must skip (a -1 used as an index would read the last slot).
    loras = [None, members[0], None, members[1], None, members[2], None, members[3]]
    prompts = [p for p in PROMPTS for _ in range(2)]
    requests = [{"prompt_token_ids": engine.encode(p)} for p in prompts]
    params = [engine._params(GREEDY, 0, 0) for _ in prompts]
    got, _ = engine._run(requests, params, loras)
    base = [c.token_ids for c in dense.generate(PROMPTS, GREEDY)]
    for k, completion in enumerate(got):
        j = k // 2
        if loras[k] is None:
            assert completion.token_ids == base[j]
        else:
            want = dense.generate([PROMPTS[j]], GREEDY, gen, k // 2)[0].token_ids
            assert completion.token_ids == want


def test_members_served_one_by_one_reuse_a_bounded_set_of_ids_and_each_is_served_its_own(engines):
    from es_serve.engines.vllm_worker import member_path

    engine, dense = engines
    capacity = engine.plan.max_cpu_loras
    assert capacity <= POP.size  # one generation's members fill the table
    first, later = Generation(POP, seed=41, epoch=0), Generation(POP, seed=41, epoch=1)
    prompt = PROMPTS[:1]

    def check(gen, member):
        want = dense.generate(prompt, GREEDY, gen, member)[0].token_ids
        assert engine.generate(prompt, GREEDY, gen, member)[0].token_ids == want
        return want

    for member in range(capacity):
        engine.generate(prompt, GREEDY, first, member)
    manager = _worker(engine).model_runner.lora_manager._adapter_manager
    # The next new member takes the id of the least recently served one, the first generation's member 0,
    # whose slot still holds it: the engine must write the new member over it, not serve the old one.
    old, new = member_path(41, 0, 0, POP), member_path(41, 1, 0, POP)
    reused = engine._lora_ids[old]
    assert next(iter(engine._lora_ids)) == old and reused in manager._active_adapters
    assert check(later, 0) != dense.generate(prompt, GREEDY, first, 0)[0].token_ids  # else this could not fail
    assert engine._lora_ids[new] == reused and old not in engine._lora_ids
    for member in range(1, 8):
        check(later, member)
    assert len(engine._lora_ids) == capacity and sorted(engine._lora_ids.values()) == list(range(1, capacity + 1))
    check(first, 0)  # served long ago, back under a reused id


# Last in this file: it leaves Adam's state in the module's engines.
def test_adam_merges_match_the_dense_engine_bit_for_bit(engines):
    from adapters import Optimizer

    engine, dense = engines
    adam = Optimizer("adam", beta1=0.8, beta2=0.99)
    base = engine.state_dict()
    engine.load_state_dict(base)  # fresh optimizer state on both
    dense.load_state_dict(base)
    for step in (1, 2):
        gen = Generation(POP, seed=9, epoch=step, step=step)
        shaped = shape_fitness(torch.randn(32, 4, generator=torch.Generator().manual_seed(step)), "centered")
        engine.apply_update(gen, shaped, lr=2e-3, optimizer=adam)
        dense.apply_update(gen, shaped, lr=2e-3, optimizer=adam)
    for name, w in engine.state_dict().items():
        assert not torch.equal(w, base[name]), name
        torch.testing.assert_close(w, dense.master[name], rtol=0, atol=0)
    state, reference = engine.optimizer_state(), dense.optimizer_state()
    assert state.keys() == reference.keys() and int(state["optimizer/adam/step"][0]) == 2
    for name, t in reference.items():
        torch.testing.assert_close(state[name], t, rtol=0, atol=0)
    assert engine.memory()["optimizer_state_bytes"] == 2 * sum(w.numel() * 4 for w in base.values())
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == [
        c.token_ids for c in dense.generate(PROMPTS, GREEDY)
    ]
