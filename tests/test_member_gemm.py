"""The fused AMX GEMM and its shrink against float64 sums: plain, with bias, with members' terms.

The shrink (h per token and slice) runs on every machine; the GEMM only where the CPU has AMX, and there
it must be available (a silent fall back to vLLM's GEMM on an AMX machine would fail here).
"""

import ctypes
from pathlib import Path

import pytest
import torch

from es_serve.engines import member_gemm, member_kernel
from es_serve.engines.member_kernel import LayerPlan, PairClaim, StepGroups

U32, U16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and bfloat16


def cpu_has_amx() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"amx_bf16", "amx_tile", "avx512_bf16"} <= set(flags.split())


needs_amx = pytest.mark.skipif(
    not member_gemm.supported(), reason="no AMX bf16 on this CPU: the fused GEMM is not built"
)


def test_supported_exactly_where_the_cpu_has_amx_and_opt_in(monkeypatch):
    assert member_gemm.supported() == cpu_has_amx()
    monkeypatch.delenv(member_gemm.ENV, raising=False)
    assert not member_gemm.enabled()
    monkeypatch.setenv(member_gemm.ENV, "1")
    assert member_gemm.enabled()
    monkeypatch.setenv(member_gemm.ENV, "yes")
    with pytest.raises(ValueError, match="ES_SERVE_FUSED_GEMM must be 1 .* or 0 .*, got 'yes'"):
        member_gemm.enabled()


def members(rank, widths, width_in, n_slots=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple((torch.randn(n_slots, 1, rank, width_in, generator=g) * 0.1).to(torch.bfloat16) for _ in widths)
    b = tuple((torch.randn(n_slots, 1, w, rank, generator=g) * 0.1).to(torch.bfloat16) for w in widths)
    return a, b


def term64(x, a, b, slots, widths, signs=None):
    """float64 member term per token: B_s (A_s x), the minus member's with its own (negated) B."""
    out = torch.zeros(x.shape[0], sum(widths), dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        offset = 0
        for ak, bk, w in zip(a, b, widths, strict=True):
            out[t, offset : offset + w] = bk[s, 0].double() @ (ak[s, 0].double() @ x[t].double())
            offset += w
    return out


def test_shrink_gives_each_tokens_h_and_slot():
    widths, width_in, rank = (64, 32), 96, 4
    a, b = members(rank, widths, width_in)
    slots = torch.tensor([3, 0, -1, 3, 5, 0, 2, -1, 3, 1])
    x = torch.randn(len(slots), width_in).to(torch.bfloat16)
    lib = member_kernel.load()
    plan = LayerPlan(a, b, widths)
    plan.refresh(lib)
    groups = StepGroups()
    groups.update(lib, slots, None, 2)
    h = torch.full((len(slots), len(widths), rank), float("nan"))
    u = torch.empty(len(slots), dtype=torch.int64)
    assert (
        lib.es_member_shrink_step(plan.struct_ptr, groups.struct_ptr, x.data_ptr(), 0.5, h.data_ptr(), u.data_ptr())
        >= 1
    )
    assert u.tolist() == slots.tolist()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for k in range(len(widths)):
            want = 0.5 * (a[k][s, 0].double() @ x[t].double())
            bound = 2 * width_in * U32 * 0.5 * (a[k][s, 0].double().abs() @ x[t].double().abs())
            assert torch.all((h[t, k].double() - want).abs() <= bound), (t, k)


def test_shrink_reads_a_claimed_pair_once_and_negates_the_minus_member():
    # Slots 1 and 4 hold one draw: the same A, B negated. Claimed, both read slot 1 and slot 4's h is
    # negated, so h . B^T of slot 1 gives slot 4's term exactly.
    widths, width_in, rank = (32,), 64, 2
    a, b = members(rank, widths, width_in)
    for t in a:
        t[4].copy_(t[1])
    for t in b:
        t[4].copy_(-t[1])
    slots = torch.tensor([1, 4, 4, 1, 0])
    x = torch.randn(len(slots), width_in).to(torch.bfloat16)
    lib = member_kernel.load()
    plan = LayerPlan(a, b, widths)
    plan.refresh(lib)
    canon = torch.arange(6)
    canon[4] = 1
    claim = PairClaim(canon, {id(a): plan.versions})
    groups = StepGroups()
    groups.update(lib, slots, claim, 1)
    member_kernel._decide_paired(plan, groups)
    assert plan.paired
    h = torch.empty(len(slots), 1, rank)
    u = torch.empty(len(slots), dtype=torch.int64)
    assert (
        lib.es_member_shrink_step(plan.struct_ptr, groups.struct_ptr, x.data_ptr(), 1.0, h.data_ptr(), u.data_ptr())
        >= 1
    )
    assert u.tolist() == [1, 1, 1, 1, 0]
    for t in (1, 2):
        own = (a[0][1, 0].float() @ x[t].float()).neg()
        assert torch.allclose(h[t, 0], own, rtol=1e-5, atol=1e-6)


class Base:
    """A vLLM CPU linear layer as the fused GEMM sees it: sizes, dtype, and the `cpu_linear` hook."""

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias
        self.output_size_per_partition, self.input_size_per_partition = weight.shape
        self.params_dtype = weight.dtype
        self.stock_calls = 0

        def stock(x, weight, bias):
            self.stock_calls += 1
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)

        self.cpu_linear = stock


class PunicaWrapperCPU:
    """vLLM's CPU wrapper as install() recognises it; its own ops only count calls."""

    def __init__(self, slots):
        self.token_lora_indices, self.stock_calls = torch.tensor(slots), 0

    def update_metadata(self):
        pass

    def add_lora_linear(self, *args, **kwargs):
        self.stock_calls += 1

    def add_lora_logits(self, *args, **kwargs):
        self.stock_calls += 1

    def add_lora_embedding(self, *args, **kwargs):
        self.stock_calls += 1


class LoraLayer:
    def __init__(self, punica, a, b, widths):
        self.punica_wrapper, self.lora_a_stacked, self.lora_b_stacked, self.output_slices = punica, a, b, widths


def layer_call(lora, fused, x, bias=None):
    """What vLLM's BaseLinearLayerWithLoRA.apply does: the base GEMM, then the LoRA call on its output."""
    y = fused.base.cpu_linear(x, fused.base.weight, bias)
    lora.punica_wrapper.add_lora_linear(y, x, lora.lora_a_stacked, lora.lora_b_stacked, 1.0, lora.output_slices)
    return y


def gemm_bound(want, x, w, extra_magnitude, k):
    return 2 * ((k + 1) * U32 * (x.double().abs() @ w.double().abs().T + extra_magnitude) + U16 * want.abs()) + 1e-30


@needs_amx
@pytest.mark.parametrize("m", [1, 17, 33, 129])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_fused_gemm_adds_each_members_term_once(m, rank):
    # qkv-like slices (two widths); tokens of 4 members in batch order, some without a member.
    widths, k = (64, 32), 96
    g = torch.Generator().manual_seed(m * 10 + rank)
    w = (torch.randn(sum(widths), k, generator=g) * 0.1).to(torch.bfloat16)
    bias = (torch.randn(sum(widths), generator=g) * 0.1).to(torch.bfloat16)
    a, b = members(rank, widths, k, seed=rank)
    slots = torch.tensor([(t * 7 + 1) % 5 - 1 for t in range(m)])  # 0, 2, -1, 1, 3, ...: gaps, no order
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    punica = PunicaWrapperCPU(slots.tolist())
    assert member_kernel.install(punica)
    punica.update_metadata()
    base = Base(w)
    lora = LoraLayer(punica, a, b, widths)
    (fused,) = member_gemm.install([(base, lora, w)])
    assert base.cpu_linear is fused
    y = layer_call(lora, fused, x, bias)
    term = term64(x, a, b, slots, widths)
    want = x.double() @ w.double().T + bias.double() + term
    magnitude = bias.double().abs() + term64(x.abs(), [t.abs() for t in a], [t.abs() for t in b], slots, widths)
    bound = gemm_bound(want, x, w, magnitude, k + rank)
    if rank > member_kernel.FUSED_MAX_RANK:  # the GEMM's output is rounded once before the kernel adds the term
        bound += 2 * U16 * (x.double() @ w.double().T + bias.double()).abs()
    assert torch.all((y.double() - want).abs() <= bound)
    report, gemm = member_kernel.report([punica]), member_gemm.report([fused])
    assert report["fast_calls"] == {"bf16": 1} and punica.stock_calls == 0 and base.stock_calls == 0
    # Up to FUSED_MAX_RANK the epilogue adds the term; above it the GEMM runs plain and the kernel adds it.
    fused_here = rank <= member_kernel.FUSED_MAX_RANK
    assert report["fused_calls"] == gemm["gemm_calls_fused"] == int(fused_here)
    assert gemm["gemm_calls_plain"] == int(not fused_here)
    # One thread gives the same bits (each output summed in one order whatever the split).
    punica._es_stats.threads = 1
    punica._es_groups.update(member_kernel.load(), punica._es_slots, None, 1)
    assert torch.equal(layer_call(lora, fused, x, bias), y)


@needs_amx
def test_plain_gemm_without_members_and_what_it_refuses():
    k, n_out = 64, 96
    w = (torch.randn(n_out, k) * 0.1).to(torch.bfloat16)
    x = torch.randn(5, 7, k).to(torch.bfloat16)  # 3-D, as a transformers-backend layer passes it
    punica = PunicaWrapperCPU([-1] * 35)
    member_kernel.install(punica)
    punica.update_metadata()
    base = Base(w)
    (fused,) = member_gemm.install([(base, LoraLayer(punica, *members(1, (n_out,), k), (n_out,)), w)])
    y = base.cpu_linear(x, w, None)
    want = x.double() @ w.double().T
    assert y.shape == (5, 7, n_out)
    flat = want.reshape(-1, n_out)
    assert torch.all((y.reshape(-1, n_out).double() - flat).abs() <= gemm_bound(flat, x.reshape(-1, k), w, 0, k))
    assert member_gemm.report([fused])["gemm_calls_plain"] == 1
    # float32 activations go to vLLM's GEMM, counted with the reason.
    base.cpu_linear(x.float(), w, None)
    assert base.stock_calls == 1
    assert list(member_gemm.report([fused])["gemm_calls_stock"]) == [
        "activations not (tokens, k) bfloat16 with unit column stride"
    ]
    # A shape the GEMM has no blocks for keeps vLLM's GEMM from the start.
    odd = Base((torch.randn(40, 24) * 0.1).to(torch.bfloat16))
    (f_odd,) = member_gemm.install([(odd, LoraLayer(punica, *members(1, (40,), 24), (40,)), odd.weight)])
    assert f_odd.reason is not None and odd.cpu_linear is not f_odd
    # restore / reinstate switch the layers between vLLM's GEMM and this one.
    member_gemm.restore([fused])
    assert member_gemm.report([fused])["gemm"] == "vllm"
    member_gemm.reinstate([fused])
    assert base.cpu_linear is fused and member_gemm.report([fused])["gemm"] == "es-amx-bf16"


def merged_layer():
    """A 64 x 64 layer on the fused GEMM with no member in the batch, and the weights a merge gives it."""
    k, n_out = 64, 64
    w = (torch.randn(n_out, k) * 0.1).to(torch.bfloat16)
    punica = PunicaWrapperCPU([-1] * 3)
    member_kernel.install(punica)
    punica.update_metadata()
    base = Base(w)
    (fused,) = member_gemm.install([(base, LoraLayer(punica, *members(1, (n_out,), k), (n_out,)), w)])
    return base, fused, torch.randn(3, k).to(torch.bfloat16), (w.float() + 0.5).to(torch.bfloat16), k


@needs_amx
def test_merge_repacks_the_new_weights():
    base, fused, x, new, k = merged_layer()
    base.weight = new
    base.cpu_linear = Base(new).cpu_linear  # what vLLM's dispatch leaves after a merge
    member_gemm.repack(fused, new, active=True)
    assert base.cpu_linear is fused
    y = base.cpu_linear(x, new, None)
    want = x.double() @ new.double().T
    assert torch.all((y.double() - want).abs() <= gemm_bound(want, x, new, 0, k))


@needs_amx
def test_merge_packs_only_and_rebuilds_vllms_gemm_when_a_call_needs_it():
    base, fused, x, new, k = merged_layer()
    rebuilt = []

    def rebuild():  # what the worker's rebuild does: vLLM's dispatch on the new weights, which replaces the hook
        base.weight = new
        base.cpu_linear = Base(new).cpu_linear
        rebuilt.append(base.cpu_linear)
        return base.cpu_linear

    assert member_gemm.pack_only(fused, [new.float()], rebuild)
    assert rebuilt == [] and base.cpu_linear is fused
    assert member_gemm.report([fused])["gemm_stock_stale"] == 1
    y = base.cpu_linear(x, None, None)
    want = x.double() @ new.double().T
    assert torch.all((y.double() - want).abs() <= gemm_bound(want, x, new, 0, k))
    assert rebuilt == []  # the fused GEMM's own calls never need vLLM's
    # A call it refuses gets vLLM's GEMM rebuilt on the merged weights, once; the fused GEMM stays installed.
    for _ in range(2):
        stock = base.cpu_linear(x.float(), None, None)
        assert torch.allclose(stock.double(), x.double() @ new.double().T, atol=1e-5)
    assert len(rebuilt) == 1 and base.cpu_linear is fused
    report = member_gemm.report([fused])
    assert (report["gemm_stock_stale"], report["gemm_stock_rebuilds"]) == (0, 1)
    # After the next merge, the switch to vLLM's GEMM (the bench's stock baseline) rebuilds it too.
    assert member_gemm.pack_only(fused, [new.float()], rebuild)
    member_gemm.restore([fused])
    assert len(rebuilt) == 2 and base.cpu_linear is rebuilt[-1]
    # Not on the fused GEMM now: pack_only declines, so the caller rebuilds vLLM's GEMM as before.
    assert not member_gemm.pack_only(fused, [new.float()], rebuild)
    assert member_gemm.report([fused])["gemm_stock_stale"] == 0
    member_gemm.reinstate([fused])

    # A rebuild that fails leaves the layer stale and the fused GEMM installed; the next call rebuilds.
    def failing():
        base.cpu_linear = None  # vLLM's dispatch had replaced the hook before failing
        raise MemoryError("no memory for oneDNN's packed weights")

    assert member_gemm.pack_only(fused, [new.float()], failing)
    with pytest.raises(MemoryError):
        base.cpu_linear(x.float(), None, None)
    assert base.cpu_linear is fused and member_gemm.report([fused])["gemm_stock_stale"] == 1
    assert member_gemm.pack_only(fused, [new.float()], rebuild)
    base.cpu_linear(x.float(), None, None)
    assert len(rebuilt) == 3 and member_gemm.report([fused])["gemm_stock_stale"] == 0


@pytest.mark.parametrize("rows", [(64,), (48, 16, 32), (40, 24)], ids=["one", "shards", "odd-shards"])
def test_packing_from_float32_shards_gives_the_bits_of_torchs_rounding(rows):
    # What a merge packs from: the float32 masters, shard by shard; against torch's own bf16 cast, packed.
    lib, k = member_kernel.load(), 64
    g = torch.Generator().manual_seed(sum(rows))
    parts = [torch.randn(r, k, generator=g) for r in rows]
    parts[0][0, :8] = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130, -(2**-140), 3.4e38, float("inf"), 0.0]
    )
    n_out = sum(rows)
    base = Base(torch.zeros(n_out, k, dtype=torch.bfloat16))
    f = member_gemm.FusedLinear(lib, base, None)
    f.pack_masters(parts)
    want = torch.empty_like(f.packed)
    assert lib.es_gemm_pack(torch.cat(parts).to(torch.bfloat16).data_ptr(), n_out, k, want.data_ptr(), 1) == 0
    assert torch.equal(f.packed.view(torch.int16), want.view(torch.int16))
    # Shards that do not start on a 16-row block are refused by the C call (the Python path casts first).
    assert lib.es_gemm_pack_f32(parts[0].data_ptr(), 8, 16, k, want.data_ptr(), 1) == -1


def test_gemm_struct_matches_the_c_layout():
    # es_gemm_lora: two int64 then four pointers, no padding on any ABI this runs on.
    assert ctypes.sizeof(member_kernel.GemmLora) == 2 * 8 + 4 * ctypes.sizeof(ctypes.c_void_p)


@needs_amx
@pytest.mark.parametrize("rank", [3, 8, 16])
def test_epilogue_at_every_rank_it_takes(rank):
    # The engine routes ranks above FUSED_MAX_RANK to the separate kernel, but es_gemm takes up to 16:
    # its epilogue is checked directly, slices meeting inside a 32-column block (48 + 16).
    widths, k, m = (48, 16), 64, 45
    g = torch.Generator().manual_seed(rank)
    w = (torch.randn(sum(widths), k, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    slots = torch.tensor([t % 4 - 1 for t in range(m)])
    bt = [(torch.randn(3, rank, wk, generator=g) * 0.1).to(torch.bfloat16) for wk in widths]
    h = torch.randn(m, len(widths), rank, generator=g)
    lib = member_kernel.load()
    packed = torch.empty(lib.es_gemm_packed_elems(sum(widths), k), dtype=torch.bfloat16)
    assert lib.es_gemm_pack(w.data_ptr(), sum(widths), k, packed.data_ptr(), 1) == 0
    c_widths = (ctypes.c_int64 * 2)(*widths)
    c_bt = (ctypes.c_void_p * 2)(*[t.data_ptr() for t in bt])
    lora = member_kernel.GemmLora(
        2, rank, ctypes.addressof(c_widths), ctypes.addressof(c_bt), slots.data_ptr(), h.data_ptr()
    )
    y = torch.full((m, sum(widths) + 8), 7.0, dtype=torch.bfloat16)  # a guard band past each row
    rc = lib.es_gemm(
        x.data_ptr(), m, k, packed.data_ptr(), sum(widths), k, None, y.data_ptr(), y.shape[1], ctypes.addressof(lora), 2
    )
    assert rc >= 1
    assert torch.all(y[:, sum(widths) :] == 7.0)
    want = x.double() @ w.double().T
    extra = torch.zeros_like(want)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            extra[t] = torch.cat([h[t, i].double() @ bt[i][s].double() for i in range(len(widths))])
    magnitude = torch.stack([
        torch.cat([h[t, i].double().abs() @ bt[i][max(s, 0)].double().abs() for i in range(len(widths))]) * (s >= 0)
        for t, s in enumerate(slots.tolist())
    ])  # fmt: skip
    want = want + extra
    assert torch.all((y[:, : sum(widths)].double() - want).abs() <= gemm_bound(want, x, w, magnitude, k + rank))
    # Rank 17 is past what the epilogue takes: refused, nothing written.
    lora.rank = 17
    before = y.clone()
    assert (
        lib.es_gemm(
            x.data_ptr(),
            m,
            k,
            packed.data_ptr(),
            sum(widths),
            k,
            None,
            y.data_ptr(),
            y.shape[1],
            ctypes.addressof(lora),
            2,
        )
        == -1
    )
    assert torch.equal(y, before)


def test_shrink_and_no_gemm_in_a_build_without_avx512(avx2_kernel):
    # What an AVX2-only CPU compiles, built here so every x86 machine tests it: the shrink on 8-wide
    # vectors against float64, and the AMX GEMM compiled out (not supported, whatever this CPU has).
    assert not member_gemm.supported()
    test_shrink_gives_each_tokens_h_and_slot()
    test_shrink_reads_a_claimed_pair_once_and_negates_the_minus_member()
