"""The ES member kernel against an explicit float64 sum in every dtype, its threads, its reporting."""

import pytest
import torch

from es_serve.engines import member_kernel
from es_serve.engines.member_kernel import KernelStats, LayerPlan, describe, member_lora, member_lora_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Unit roundoff u = eps / 2 of each dtype: one rounding moves a value by at most u times itself.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def reference(y, x, a_stacked, b_stacked, slots, widths, scale):
    out = y.double().clone()
    offset = 0
    for a, b, width in zip(a_stacked, b_stacked, widths, strict=True):
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                delta = b[s, 0].double() @ (a[s, 0].double() @ x[t].double()) * scale
                out[t, offset : offset + width] += delta[:width]
        offset += width
    return out


def error_bound(want, y, x, a_stacked, b_stacked, slots, widths, scale):
    """Largest error allowed per element, derived rather than tuned.

    Inputs are exact in their dtype, so all error comes from float32 sums and one final rounding:
    a float32 sum of n terms in any order is off by at most n * u32 * (sum of |terms|) to first
    order, here n = in + rank + 1 terms deep (A x, then B h, then + y); then the result is rounded
    once to the dtype (u_dtype * |result|). Doubled for the second-order terms.
    """
    rank, width_in = a_stacked[0].shape[2], x.shape[1]
    magnitude = reference(
        y.abs(), x.abs(), [t.abs() for t in a_stacked], [t.abs() for t in b_stacked], slots, widths, abs(scale)
    )
    u32, u = UNIT_ROUNDOFF[torch.float32], UNIT_ROUNDOFF[y.dtype]
    return 2 * ((width_in + rank + 1) * u32 * magnitude + u * want.abs())


def case(rank, dtype=torch.float32, seed=0, slots=(0, 4, -1, 2, 2, 3, -1, 1, 0), widths=(40, 3, 17), width_in=77):
    # width_in 77 = two full 32-wide bf16 blocks and a masked tail; widths cover vector loops and remainders.
    g = torch.Generator().manual_seed(seed)
    n_slots = 5
    a = [torch.randn(n_slots, 1, rank, width_in, generator=g).to(dtype) for _ in widths]
    b = [torch.randn(n_slots, 1, w, rank, generator=g).to(dtype) for w in widths]
    x = torch.randn(len(slots), width_in, generator=g).to(dtype)
    y = torch.randn(len(slots), sum(widths), generator=g).to(dtype)
    return y, x, a, b, torch.tensor(slots), widths


def check(got, y, x, a, b, slots, widths, scale):
    want = reference(y, x, a, b, slots, widths, scale)
    err = (got.double() - want).abs()
    bound = error_bound(want, y, x, a, b, slots, widths, scale)
    assert torch.all(err <= bound), f"worst excess {(err - bound).max().item():.3g}"
    # Tokens without an adapter (slot -1) are left exactly as they were.
    untouched = slots < 0
    assert torch.equal(got[untouched], y[untouched])


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_kernel_matches_float64_sum(rank, dtype):
    y, x, a, b, slots, widths = case(rank, dtype)
    got = y.clone()
    stats = KernelStats()
    path = member_lora(got, x, a, b, slots, widths, 0.5, stats=stats)
    assert path == f"es-c-{member_kernel.DTYPES[dtype][1]}"
    assert sum(stats.fast.values()) == 1 and not stats.fallback
    check(got, y, x, a, b, slots, widths, 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_torch_fallback_matches_float64_sum(dtype):
    y, x, a, b, slots, widths = case(4, dtype)
    got = y.clone()
    member_lora_torch(got, x, a, b, slots, widths, 0.5)
    check(got, y, x, a, b, slots, widths, 0.5)


def test_compiled_kernel_is_used_here():
    # The machines this project targets have a C compiler; a silent fallback would hide a regression.
    assert member_kernel.load() is not None, member_kernel.load_error()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_writes_into_a_strided_output_slice(dtype):
    # vLLM hands the layer output as a view; the kernel must honour its row stride.
    y_full, x, a, b, slots, widths = case(1, dtype, widths=(4, 4))
    big = torch.zeros(y_full.shape[0], 20, dtype=dtype)
    big[:, 5:13] = y_full
    view = big[:, 5:13]
    assert member_lora(view, x, a, b, slots, widths, 1.0).startswith("es-c-")
    check(view, y_full, x, a, b, slots, widths, 1.0)
    assert torch.all(big[:, :5] == 0) and torch.all(big[:, 13:] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_threaded_path_equals_serial(dtype):
    info = member_kernel.kernel_info()
    if not (info.get("openmp") and info.get("threads_ok")):
        pytest.skip(f"kernel built without usable OpenMP threads here: {info}")
    slots = tuple((t * 7) % 6 - 1 for t in range(96))  # every slot and some -1 rows, interleaved
    y, x, a, b, slots, widths = case(8, dtype, slots=slots, widths=(100, 50))
    serial, threaded = y.clone(), y.clone()
    one, two = KernelStats(), KernelStats()
    member_lora(serial, x, a, b, slots, widths, 0.5, threads=1, stats=one)
    member_lora(threaded, x, a, b, slots, widths, 0.5, threads=2, stats=two)
    assert one.team == 1 and two.team == 2  # the call really split its tokens over two threads
    assert torch.equal(serial, threaded)  # each token is summed by one thread in the same order
    check(threaded, y, x, a, b, slots, widths, 0.5)


def test_small_batches_stay_on_one_thread():
    y, x, a, b, slots, widths = case(1, torch.bfloat16)
    stats = KernelStats()
    member_lora(y, x, a, b, slots, widths, 1.0, threads=2, stats=stats)
    assert stats.team == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_portable_c_paths_match_float64_sum(dtype, tmp_path, monkeypatch):
    # The paths a CPU without native bf16 / _Float16 compiles, built here on purpose so every
    # machine tests them (CI may have only one of the two).
    monkeypatch.setenv("ES_SERVE_CACHE", str(tmp_path))
    try:
        path = member_kernel.build(extra=["-mno-avx512bf16", "-DES_NO_FLOAT16"])
    except RuntimeError:
        path = member_kernel.build(extra=["-DES_NO_FLOAT16"])  # compilers that do not know the flag
    lib, info = member_kernel.open_library(path)
    assert not info["bf16_native"]
    monkeypatch.setattr(member_kernel, "_library", lib)
    monkeypatch.setattr(member_kernel, "_info", info)
    for rank in (1, 2, 3, 4, 8):
        y, x, a, b, slots, widths = case(rank, dtype)
        got = y.clone()
        assert member_lora(got, x, a, b, slots, widths, 0.5).startswith("es-c-")
        check(got, y, x, a, b, slots, widths, 0.5)


def test_fallbacks_are_counted_with_their_reason_and_reported_as_such():
    stats = KernelStats()
    y, x, a, b, slots, widths = case(2, torch.float64)
    path = member_lora(y.clone(), x, a, b, slots, widths, 1.0, stats=stats)
    assert path == "torch: lora dtype float64 (kernel: float32, bfloat16, float16)"
    assert describe(stats.as_dict()) == "es-torch-fallback"

    # Activations in another dtype than the LoRA weights: vLLM allows a separate lora_dtype.
    y, x, a, b, slots, widths = case(2, torch.float32)
    got = y.bfloat16()
    assert member_lora(got, x.bfloat16(), a, b, slots, widths, 1.0, stats=stats) == (
        "torch: activations bfloat16, lora float32"
    )
    member_lora(y.clone(), x, a, b, slots, widths, 1.0, stats=stats)  # one fast call
    assert stats.fast == {"f32": 1}
    assert stats.fallback == {
        "lora dtype float64 (kernel: float32, bfloat16, float16)": 1,
        "activations bfloat16, lora float32": 1,
    }
    # One fallback among fast calls is still named: the fast kernel alone is never claimed.
    assert describe(stats.as_dict()) == "es-c-f32+es-torch-fallback"
    assert describe(KernelStats().as_dict()) == "es-idle"


def test_an_output_with_fewer_rows_than_tokens_is_refused_not_written_past():
    # vLLM always passes one output row per token; anything else must never reach the C kernel, which
    # would write past the tensor. Both entry points refuse it (the torch fallback then raises).
    y, x, a, b, slots, widths = case(2, torch.float32)
    short = y[:-1].clone()
    stats = KernelStats()
    with pytest.raises((IndexError, RuntimeError)):
        member_lora(short, x, a, b, slots, widths, 1.0, stats=stats)
    assert stats.fast == {} and stats.fallback == {"output or slot indices do not match the batch": 1}
    punica = PunicaWrapperCPU(slots.tolist())
    member_kernel.install(punica)
    punica.update_metadata()
    with pytest.raises((IndexError, RuntimeError)):
        punica.add_lora_linear(short, x, tuple(a), tuple(b), 1.0, widths)
    report = member_kernel.report([punica])
    assert report["fast_calls"] == {}
    assert report["fallback_calls"] == {"activations not (tokens, features) with unit column stride": 1}


def test_missing_library_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(member_kernel, "_library", None)
    monkeypatch.setattr(member_kernel, "_load_error", "no C compiler 'cc' on PATH")
    y, x, a, b, slots, widths = case(1, torch.bfloat16)
    got, stats = y.clone(), KernelStats()
    assert member_lora(got, x, a, b, slots, widths, 1.0, stats=stats) == "torch: no compiled kernel"
    assert describe(stats.as_dict()) == "es-torch-fallback"
    check(got, y, x, a, b, slots, widths, 1.0)


class PunicaWrapperCPU:
    """Stands in for vLLM's wrapper (install() recognises it by class name): its own ops mark calls."""

    def __init__(self, slots):
        self.slots, self.stock_calls = torch.tensor(slots), 0

    def update_metadata(self):
        self.token_lora_indices = self.slots

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
        self.stock_calls += 1

    def add_lora_logits(self, *args, **kwargs):
        self.stock_calls += 1

    def add_lora_embedding(self, *args, **kwargs):
        self.stock_calls += 1


def test_install_counts_fast_calls_validates_once_and_uninstall_restores_vllm():
    y, x, a, b, slots, widths = case(1, torch.bfloat16)
    punica = PunicaWrapperCPU(slots.tolist())
    assert member_kernel.install(punica)
    report = member_kernel.report([punica])
    assert report["kernel"] == "es-idle" and report["installed"]
    punica.update_metadata()
    a_t, b_t = tuple(a), tuple(b)
    got = y.clone()
    for _ in range(3):
        punica.add_lora_linear(got, x, a_t, b_t, 1.0, widths)
    report = member_kernel.report([punica])
    assert report["fast_calls"] == {"bf16": 3} and report["kernel"] == "es-c-bf16" and punica.stock_calls == 0
    # A batch whose token count does not match the slots is handed to vLLM's op and counted.
    punica.add_lora_linear(y[:2].clone(), x[:2], a_t, b_t, 1.0, widths)
    assert punica.stock_calls == 1
    assert member_kernel.report([punica])["kernel"] == "es-c-bf16+es-torch-fallback"
    member_kernel.uninstall(punica)
    assert member_kernel.report([punica])["kernel"] == "vllm"
    punica.add_lora_linear(got, x, a_t, b_t, 1.0, widths)
    assert punica.stock_calls == 2


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("ES_SERVE_CACHE", str(tmp_path))
    first = member_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert member_kernel.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ES_SERVE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-cc'"):
        member_kernel.build("no-such-cc")


def test_padded_rank_and_adapters_written_between_calls():
    # vLLM pads rank-4 members to slots of rank 8 (zero rows) and rewrites slots in place between
    # engine steps; the layer plan is cached, so it must notice the writes and use the new values.
    y, x, a4, b4, slots, widths = case(4, torch.bfloat16)
    a = tuple(torch.zeros(t.shape[0], 1, 8, t.shape[3], dtype=t.dtype) for t in a4)
    b = tuple(torch.zeros(t.shape[0], 1, t.shape[2], 8, dtype=t.dtype) for t in b4)
    for dst, src in zip(a + b, a4 + b4, strict=True):
        dst[..., : src.shape[2], : src.shape[3]].copy_(src)
    punica = PunicaWrapperCPU(slots.tolist())
    member_kernel.install(punica)
    punica.update_metadata()
    got = y.clone()
    punica.add_lora_linear(got, x, a, b, 1.0, widths)
    check(got, y, x, a, b, slots, widths, 1.0)
    # Re-read only after a write, and the time it took counted apart from the kernel's.
    reread = member_kernel.report([punica])["plan_seconds"]
    assert reread > 0
    punica.add_lora_linear(y.clone(), x, a, b, 1.0, widths)
    assert member_kernel.report([punica])["plan_seconds"] == reread
    # A new member of the same rank in slot 3: the plan re-reads B into the transpose it already holds.
    g = torch.Generator().manual_seed(9)
    for t in a:
        t[3, 0, :4].copy_(torch.randn(t[3, 0, :4].shape, generator=g).to(t.dtype))
    for t in b:
        t[3, 0, :, :4].copy_(torch.randn(t[3, 0, :, :4].shape, generator=g).to(t.dtype))
    got = y.clone()
    punica.add_lora_linear(got, x, a, b, 1.0, widths)
    check(got, y, x, a, b, slots, widths, 1.0)
    assert member_kernel.report([punica])["plan_seconds"] > reread
    # A new member in slot 2, now of full rank 8, written the way vLLM's set_lora writes it.
    for t in a:
        t[2, 0].copy_(torch.randn(t.shape[2:], generator=g).to(t.dtype))
    for t in b:
        t[2, 0].copy_(torch.randn(t.shape[2:], generator=g).to(t.dtype))
    got = y.clone()
    punica.add_lora_linear(got, x, a, b, 1.0, widths)
    check(got, y, x, a, b, slots, widths, 1.0)
    assert member_kernel.report([punica])["kernel"] == "es-c-bf16"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_plan_finds_the_used_rank_and_transposes_b(dtype):
    # vLLM pads every slot to its max rank with zero rows; the plan cuts A and B to the highest row any
    # slot uses. Rows of 77 values end in a part shorter than the 8-byte words the scan reads.
    widths = (40, 3)
    a = tuple(torch.zeros(5, 1, 8, 77, dtype=dtype) for _ in widths)
    b = tuple(torch.randn(5, 1, w, 8).to(dtype) for w in widths)
    lib = member_kernel.load()

    def used_rank():
        plan = LayerPlan(a, b, widths)
        plan.refresh(lib, 2)
        return plan

    assert used_rank().rank == 0
    a[1][3, 0, 5, 76] = 1.5  # the last value of row 5 of slot 3, second slice
    assert used_rank().rank == 6
    a[0][0, 0, 7, 0] = -0.0  # a negative zero is still zero
    assert used_rank().rank == 6
    a[0][4, 0, 6, 10] = float("nan")  # not zero
    plan = used_rank()
    assert plan.rank == 7
    for got, want in zip(plan.bt, b, strict=True):
        assert torch.equal(got, want[:, 0, :, :7].transpose(1, 2))


@pytest.mark.parametrize("rank", [1, 4, 9])  # 9: past the ranks whose B is widened once per group
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_engine_step_path_matches_float64_sum_on_a_large_shuffled_batch(rank, dtype):
    # The per-step grouping (StepGroups) shared by all layers of a step, as an engine runs it: many
    # tokens per slot (several groups each), slots out of order, tokens without adapter, two threads,
    # and two layers of different shapes reusing one grouping.
    g = torch.Generator().manual_seed(rank)
    n_slots, tokens = 24, 300
    slots = torch.randint(-1, n_slots, (tokens,), generator=g)
    punica = PunicaWrapperCPU(slots.tolist())
    member_kernel.install(punica)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the step's threads are torch's, read when the step's grouping is made
    try:
        punica.update_metadata()
    finally:
        torch.set_num_threads(before)
    assert punica._es_groups.tokens == tokens and punica._es_groups.n_units > n_slots  # grouped once, here
    for widths, width_in in (((40, 3, 17), 77), ((300,), 33)):
        a = tuple(torch.randn(n_slots, 1, rank, width_in, generator=g).to(dtype) for _ in widths)
        b = tuple(torch.randn(n_slots, 1, w, rank, generator=g).to(dtype) for w in widths)
        x = torch.randn(tokens, width_in, generator=g).to(dtype)
        y = torch.randn(tokens, sum(widths), generator=g).to(dtype)
        got = y.clone()
        punica.add_lora_linear(got, x, a, b, 0.5, widths)
        check(got, y, x, a, b, slots, widths, 0.5)
    report = member_kernel.report([punica])
    assert report["fallback_calls"] == {} and report["kernel_threads_max"] == 2


@pytest.mark.parametrize("rank", [1, 4, 9])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_antithetic_pairs_read_once_give_each_members_own_bits(rank, dtype):
    # Slots holding a pair's two members (same A, B negated, as es_prepare writes them) share their
    # units: the output must be bit for bit what reading every slot's own rows gives, and within the
    # float64 bound. A write to the layer after the claim must end the sharing for that layer.
    from es_serve.engines.member_kernel import PairClaim, layer_versions

    g = torch.Generator().manual_seed(10 + rank)
    n_slots, tokens, widths, width_in = 24, 300, (40, 3, 17), 77
    slots = torch.randint(-1, n_slots, (tokens,), generator=g)
    a = tuple(torch.randn(n_slots, 1, rank, width_in, generator=g).to(dtype) for _ in widths)
    b = tuple(torch.randn(n_slots, 1, w, rank, generator=g).to(dtype) for w in widths)
    order = torch.randperm(n_slots, generator=g).tolist()
    canon = torch.arange(n_slots)
    for plus, minus in zip(order[:20:2], order[1:20:2], strict=True):  # 10 pairs, 4 slots alone
        canon[minus] = plus
        for t in a:
            t[minus].copy_(t[plus])
        for t in b:
            t[minus].copy_(-t[plus])
    x = torch.randn(tokens, width_in, generator=g).to(dtype)
    y = torch.randn(tokens, sum(widths), generator=g).to(dtype)

    own = PunicaWrapperCPU(slots.tolist())
    member_kernel.install(own)
    own.update_metadata()
    want = y.clone()
    own.add_lora_linear(want, x, a, b, 0.5, widths)
    assert member_kernel.report([own])["paired_calls"] == 0

    shared = PunicaWrapperCPU(slots.tolist())
    member_kernel.install(shared)
    shared._es_claim = PairClaim(canon, {id(a): layer_versions(a, b)})
    shared._es_stats.threads = 2
    shared.update_metadata()
    shared._es_stats.threads = 2
    got = y.clone()
    shared.add_lora_linear(got, x, a, b, 0.5, widths)
    assert member_kernel.report([shared])["paired_calls"] == 1
    assert torch.equal(got, want)
    check(got, y, x, a, b, slots, widths, 0.5)

    # vLLM writes another adapter into a minus member's slot: the layer reads each slot's own rows.
    minus = order[1]
    for t in b:
        t[minus, 0].copy_(torch.randn(t.shape[2:], generator=g).to(dtype))
    got = y.clone()
    shared.add_lora_linear(got, x, a, b, 0.5, widths)
    assert member_kernel.report([shared])["paired_calls"] == 1
    check(got, y, x, a, b, slots, widths, 0.5)


def test_pair_claims_that_group_more_than_a_pair_are_refused():
    from es_serve.engines.member_kernel import PairClaim

    with pytest.raises(ValueError, match="more than two"):
        PairClaim(torch.tensor([0, 0, 0, 3]), {})
    with pytest.raises(ValueError, match="itself grouped"):
        PairClaim(torch.tensor([1, 2, 2, 3]), {})
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        PairClaim(torch.tensor([0, 1, 5, 3]), {})
    assert PairClaim(torch.tensor([0, 0, 2, 2]), {}).pairs == 2


def test_build_without_avx512_matches_float64_sum_with_and_without_pairs(avx2_kernel):
    # What an AVX2-only CPU compiles (the register-blocked path on 8-wide vectors, no AVX-512 at all),
    # built here so every x86 machine tests it, with the per-step grouping and antithetic pairs as an
    # engine runs them.
    _, info = avx2_kernel
    assert not info["bf16_native"]
    for dtype in DTYPES:
        for rank in (1, 2, 3, 4, 5, 8):  # every register block of the AVX2 path, and the general loop
            test_kernel_matches_float64_sum(rank, dtype)
        for rank in (1, 4):
            test_engine_step_path_matches_float64_sum_on_a_large_shuffled_batch(rank, dtype)
            test_antithetic_pairs_read_once_give_each_members_own_bits(rank, dtype)
