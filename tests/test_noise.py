import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from adapters import NoiseKey, noise_epoch, pair_factors, stacked_factors
from adapters import normal as nm
from adapters.noise import NOISE_VERSION, check_noise_version

# Computed once with noise version 2 and checked in: (key fields, (m, n, r)) -> the first six float32
# values of torch.cat([A.flatten(), B.flatten()]) as bit patterns, and the sha256 of all of them.
GOLDEN = [
    (
        (0, 0, 0, 0, "q_proj"),
        (4, 3, 1),
        ["bf0a9206", "3dc33553", "3ff56339", "bda652e3", "3efb9092", "bea1c813"],
        "3f3c1264a70875b39b7a34faac3249f6994090407c3e58344531ada42d43e3fc",
    ),
    (
        (7, 3, 5, 11, "gate_proj"),
        (48, 32, 2),
        ["bf64b711", "3f069f19", "bf077394", "3f4551fe", "beb4347d", "3ed705aa"],
        "77b91adacaa5d8a3766008c1c41dc38bc61ac23aa9622254a25d603ab291e6c8",
    ),
    (
        (2**40, 123, 511, 29, "down_proj"),
        (576, 1536, 4),
        ["bfa0ebd6", "3fd2ec28", "bf58a083", "3f15727b", "3e7cb00a", "4006fd5f"],
        "db3b30f18542c0ceb98e1191acbc1aca7f0c2ebbc30f861acde547c2f8114de0",
    ),
]
# stacked_factors(7, 3, range(64), 11, "gate_proj", 1536, 576, 1): sha256 of the (64, 2112) block [A | B].
GOLDEN_STACKED = "7fb2c6b49a2f9d21738741e1734d949adfbe0bf3a43b069bc1a534624f085e86"

# What a subprocess prints: one sha256 per golden key, then the stacked block's, then version 1's.
DIGESTS = """
import hashlib, sys, torch
from adapters import NoiseKey, pair_factors, stacked_factors
import adapters.normal as nm
if sys.argv[1] == "numpy":
    nm._load_error = "numpy path forced by the test"
def digest(a, b):
    return hashlib.sha256(torch.cat([a.flatten(), b.flatten()]).numpy().tobytes()).hexdigest()
for key, shape in [((0, 0, 0, 0, "q_proj"), (4, 3, 1)), ((7, 3, 5, 11, "gate_proj"), (48, 32, 2)),
                   ((2**40, 123, 511, 29, "down_proj"), (576, 1536, 4))]:
    print(digest(*pair_factors(NoiseKey(*key), *shape)))
a, b = stacked_factors(7, 3, range(64), 11, "gate_proj", 1536, 576, 1)
print(hashlib.sha256(torch.cat([a.flatten(1), b.flatten(1)], 1).numpy().tobytes()).hexdigest())
print(digest(*pair_factors(NoiseKey(7, 3, 5, 11, "gate_proj"), 480, 320, 2, noise=1)))
"""


def _bits(t: torch.Tensor) -> list[str]:
    return [f"{v:08x}" for v in t.numpy().view(np.uint32).tolist()]


def _digests(env: dict, path: str = "default") -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DIGESTS, path], capture_output=True, text=True, env=env, check=True)
    return proc.stdout.split()


def test_golden_values():
    for fields, (m, n, r), first, digest in GOLDEN:
        a, b = pair_factors(NoiseKey(*fields), m, n, r)
        z = torch.cat([a.flatten(), b.flatten()])
        assert _bits(z[:6]) == first, fields
        assert hashlib.sha256(z.numpy().tobytes()).hexdigest() == digest, fields
    a, b = stacked_factors(7, 3, range(64), 11, "gate_proj", 1536, 576, 1)
    block = torch.cat([a.flatten(1), b.flatten(1)], 1)
    assert hashlib.sha256(block.numpy().tobytes()).hexdigest() == GOLDEN_STACKED


def _numpy_features_to_disable() -> str:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))


def _torch_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run (torch does not check: a missing one crashes)."""
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    caps = ["default"]
    if {"avx2", "fma"} <= flags:
        caps.append("avx2")
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        caps.append("avx512")
    return caps


def test_same_bits_under_every_torch_cpu_capability_and_without_the_compiled_kernel(capsys):
    """Version 2 gives the golden bytes whatever kernels torch and numpy pick, with or without the C path."""
    runs = {cap: _digests({"ATEN_CPU_CAPABILITY": cap}) for cap in _torch_capabilities()}
    runs["numpy path, numpy SIMD dispatch off"] = _digests(
        {"ATEN_CPU_CAPABILITY": "default", "NPY_DISABLE_CPU_FEATURES": _numpy_features_to_disable()}, "numpy"
    )
    golden = [g[3] for g in GOLDEN] + [GOLDEN_STACKED]
    with capsys.disabled():
        print()
        for name, got in runs.items():
            print(f"  {name:40s} v2 {' '.join(d[:12] for d in got[:4])}   v1 {got[4][:12]}")
    for name, got in runs.items():
        assert got[:4] == golden, name


def test_compiled_kernel_matches_numpy_bit_for_bit():
    kernel = nm.load()
    if kernel is None:
        pytest.skip(f"no compiled noise kernel here: {nm.load_error()}")
    rng = np.random.default_rng(0)
    _assert_kernel_fill_equals_numpy(kernel, rng, streams=40, longest=50_000)
    # Every position through the slow path, whatever its first word: wedges, redraws and ~800 tails.
    s, p = rng.integers(0, 2**63, 200_000, dtype=np.uint64), rng.integers(0, 2**40 - 1, 200_000)
    slow_c, slow_np = nm._slow_c(kernel, s, p), nm._slow(s, p)
    assert np.array_equal(slow_c.view(np.uint64), slow_np.view(np.uint64))
    assert (np.abs(slow_np) > nm.R).sum() > 100


def test_draw_split_over_threads_matches_numpy_bit_for_bit(monkeypatch):
    # Large draws are cut into runs of whole streams filled on threads; rejects keep their global
    # positions, so the slow path finishes the right values. Forced here on a modest draw.
    kernel = nm.load()
    if kernel is None:
        pytest.skip(f"no compiled noise kernel here: {nm.load_error()}")
    monkeypatch.setattr(nm, "PARALLEL_MIN_VALUES", 1000)
    monkeypatch.setattr(nm.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    values = _assert_kernel_fill_equals_numpy(kernel, np.random.default_rng(1), streams=57, longest=20_000)
    assert (np.abs(values) > nm.R).sum() > 0  # some values came through the slow path


def _assert_kernel_fill_equals_numpy(kernel, rng, streams: int, longest: int) -> np.ndarray:
    """Random streams filled by the compiled kernel and by numpy: the same bits. Returns the values."""
    starts = rng.integers(0, 2**64 - 1, streams, dtype=np.uint64, endpoint=True)
    lengths = rng.integers(0, longest, streams)
    a, b = np.empty(lengths.sum(), np.float32), np.empty(lengths.sum(), np.float32)
    nm.fill(starts, lengths, a, kernel=kernel)
    nm.fill(starts, lengths, b, kernel=False)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    return b


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
def test_kernel_built_with_other_optimisation_and_instruction_set_gives_the_same_bits(tmp_path):
    """-O0 and -O3 -march=native (FMA units present) must not change a bit: nothing may be fused."""
    starts = np.arange(1, 33, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    lengths = np.full(32, 20_000)
    reference = np.empty(lengths.sum(), np.float32)
    nm.fill(starts, lengths, reference, kernel=False)
    variants = [["-O0"], ["-O3", "-march=native"]] if platform.machine() in ("x86_64", "AMD64") else [["-O0"]]
    for i, flags in enumerate(variants):
        kernel = nm.Kernel(nm.build(flags=flags, target=tmp_path / f"normal{i}.so"))
        got = np.empty_like(reference)
        nm.fill(starts, lengths, got, kernel=kernel)
        assert np.array_equal(got.view(np.uint32), reference.view(np.uint32)), flags


def test_bits_are_splitmix64():
    """Published SplitMix64 outputs (reference C code, seeds 0 and 1234567)."""
    assert nm.words(np.zeros(1, np.uint64), np.ones(1, np.int64))[0] == 0xE220A8397B1DCDAF
    got = nm.words(np.full(3, 1234567, np.uint64), np.arange(1, 4)).tolist()
    assert got == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_exact_operation_exp_and_log_match_libm():
    t = -np.linspace(0, 30, 100_001)
    got, want = nm.exp_neg(t), np.array([math.exp(x) for x in t])
    assert np.max(np.abs(got - want) / want) < 4 * 2.0**-52
    u = np.concatenate([np.linspace(1e-6, 1, 100_000), 2.0 ** -np.arange(1, 60), [1.0 - 2.0**-53]])
    got, want = nm.log_unit(u), np.array([math.log(x) for x in u])
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300)) < 4 * 2.0**-52
    assert nm.log_unit(np.array([1.0]))[0] == 0.0


def test_ziggurat_tables():
    r, v, x = nm.R, nm.V, nm.TABLES["x"]
    # V is the base strip's area: R f(R) plus the tail integral of exp(-x^2/2) beyond R.
    assert v == pytest.approx(
        r * math.exp(-r * r / 2) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2)), rel=1e-14
    )
    # Every layer has area V, and the recursion closes at the top: the last box reaches f = 1.
    f = [math.exp(-t * t / 2) for t in x]
    areas = [x[i] * ((1.0 if i == 1 else f[i - 1]) - f[i]) for i in range(1, 256)]
    assert max(abs(a / v - 1) for a in areas) < 1e-12
    assert 256 * v > math.sqrt(math.pi / 2)  # the boxes cover the half-curve


def _ks_statistic(z: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance to N(0, 1), the CDF from torch's erfc in float64."""
    z = np.sort(z.astype(np.float64))
    cdf = (0.5 * torch.special.erfc(torch.from_numpy(-z) / math.sqrt(2))).numpy()
    n = len(z)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


def test_distribution_is_standard_normal():
    n = 4_000_000
    a, b = stacked_factors(3, 0, range(1000), 0, "up_proj", 2000, 2000, 1)
    z = torch.cat([a.flatten(), b.flatten()]).double().numpy()
    assert z.size == n
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(np.mean(z**3)) < 5 * math.sqrt(15) * se
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96) * se
    # 1.95 / sqrt(n) is the 0.1 % critical value of the KS distance.
    assert _ks_statistic(z) < 1.95 * se
    for cut in (2.0, 3.0, nm.R, 4.0, 4.5):  # two-sided tail counts, beyond R from the tail method
        p = math.erfc(cut / math.sqrt(2))
        count = int(np.sum(np.abs(z) > cut))
        assert abs(count - n * p) < 5 * math.sqrt(n * p) + 3, cut
    # The tail method's draws, conditioned on |z| > R, against the conditional normal CDF.
    tail = np.sort(np.abs(z[np.abs(z) > nm.R]))
    cond = np.array([math.erfc(t / math.sqrt(2)) for t in tail]) / math.erfc(nm.R / math.sqrt(2))
    k = len(tail)
    d = max(np.max(np.arange(1, k + 1) / k - (1 - cond)), np.max((1 - cond) - np.arange(k) / k))
    assert d < 1.95 / math.sqrt(k)


def test_same_key_same_numbers_in_another_process():
    key = NoiseKey(seed=7, epoch=3, pair=5, layer=11, module="gate_proj")
    a, b = pair_factors(key, 48, 32, 2)
    code = (
        "import sys, torch; from adapters import NoiseKey, pair_factors;"
        "a, b = pair_factors(NoiseKey(7, 3, 5, 11, 'gate_proj'), 48, 32, 2);"
        "sys.stdout.buffer.write(torch.cat([a, b]).numpy().tobytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out == torch.cat([a, b]).numpy().tobytes()


def test_stacked_and_single_draws_agree_and_streams_are_prefix_stable():
    a, b = stacked_factors(1, 2, [0, 5, 9], 3, "o_proj", 40, 30, 2)
    for i, pair in enumerate([0, 5, 9]):
        pa, pb = pair_factors(NoiseKey(1, 2, pair, 3, "o_proj"), 40, 30, 2)
        assert torch.equal(a[i], pa) and torch.equal(b[i], pb)
    # Value j of a stream does not depend on how many values are drawn after it.
    short = np.empty(10, np.float32)
    long = np.empty(10_000, np.float32)
    nm.fill([12345], [10], short)
    nm.fill([12345], [10_000], long)
    assert np.array_equal(short, long[:10])


def test_version_1_is_torch_randn_on_the_keys_generator():
    key = NoiseKey(4, 1, 2, 3, "v_proj")
    a, b = pair_factors(key, 30, 20, 3, noise=1)
    gen = torch.Generator().manual_seed(key.generator_seed())
    z = torch.randn((50, 3), generator=gen)
    assert torch.equal(torch.cat([a, b]), z)
    sa, sb = stacked_factors(4, 1, [0, 2], 3, "v_proj", 30, 20, 3, noise=1)
    assert torch.equal(sa[1], a) and torch.equal(sb[1], b)
    assert not torch.equal(pair_factors(key, 30, 20, 3, noise=2)[0], a)


def test_unknown_noise_version_is_refused():
    assert check_noise_version(NOISE_VERSION) == 2
    with pytest.raises(ValueError, match="unknown noise version 3"):
        pair_factors(NoiseKey(0, 0, 0, 0, "q_proj"), 4, 4, 1, noise=3)
    with pytest.raises(ValueError, match="unknown noise version"):
        stacked_factors(0, 0, [0], 0, "q_proj", 4, 4, 1, noise="2")


def test_shapes_and_split():
    a, b = pair_factors(NoiseKey(0, 0, 0, 0, "q_proj"), 6, 4, 3)
    assert a.shape == (6, 3) and b.shape == (4, 3) and a.dtype == torch.float32


@pytest.mark.parametrize(
    "other",
    [
        NoiseKey(1, 0, 0, 0, "q_proj"),
        NoiseKey(0, 1, 0, 0, "q_proj"),
        NoiseKey(0, 0, 1, 0, "q_proj"),
        NoiseKey(0, 0, 0, 1, "q_proj"),
        NoiseKey(0, 0, 0, 0, "k_proj"),
        NoiseKey(0, 0, 1, 1, "q_proj"),
    ],
)
def test_different_keys_are_uncorrelated(other):
    base = torch.cat(pair_factors(NoiseKey(0, 0, 0, 0, "q_proj"), 4000, 4000, 1)).flatten()
    z = torch.cat(pair_factors(other, 4000, 4000, 1)).flatten()
    corr = torch.corrcoef(torch.stack([base, z]))[0, 1].item()
    # 8000 independent pairs: |corr| has std ~0.011; 0.05 is a 4.5-sigma bound.
    assert abs(corr) < 0.05
    assert not torch.equal(base, z)


def test_many_keys_are_jointly_uncorrelated():
    """All pairwise correlations among 64 pairs' streams stay within the independent-noise spread."""
    a, b = stacked_factors(0, 0, range(64), 0, "q_proj", 3000, 3000, 1)
    z = torch.cat([a, b], 1).squeeze(-1).double()
    corr = torch.corrcoef(z)
    off = corr[~torch.eye(64, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(6000)
    assert abs(off.mean()) < 5 / math.sqrt(6000 * 64 * 63 / 2)


def test_pair_and_layer_swap_are_not_the_same_stream():
    x = torch.cat(pair_factors(NoiseKey(0, 0, 1, 2, "q_proj"), 50, 50, 1))
    y = torch.cat(pair_factors(NoiseKey(0, 0, 2, 1, "q_proj"), 50, 50, 1))
    assert not torch.equal(x, y)


def test_noise_reuse_epochs():
    assert [noise_epoch(s, 4) for s in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert [noise_epoch(s, 1) for s in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="noise reuse must be >= 1"):
        noise_epoch(3, 0)


def test_draw_block_into_a_reused_buffer_gives_the_same_numbers_and_refuses_a_wrong_one():
    from adapters import draw_block

    keys = [NoiseKey(3, 1, d, 0, "q_proj") for d in range(3)]
    shapes = [(5, 7), (2, 3), (4, 4)]
    # Each key's draw on its own (stacked_factors fills its own array), concatenated: the block's layout.
    parts = [stacked_factors(3, 1, [d], 0, "q_proj", m, n, 2) for d, (m, n) in enumerate(shapes)]
    expected = torch.cat([torch.cat([a[0], b[0]]).flatten() for a, b in parts])
    buffer = torch.full((expected.numel() + 11,), float("nan"))
    got = draw_block(keys, shapes, 2, out=buffer)
    assert torch.equal(got, expected) and got.data_ptr() == buffer.data_ptr()
    assert torch.isnan(buffer[expected.numel() :]).all()  # nothing written past the block
    with pytest.raises(ValueError, match="at least 50 numbers"):
        draw_block(keys, shapes, 2, out=torch.empty(49))
    with pytest.raises(ValueError, match="float32"):
        draw_block(keys, shapes, 2, out=torch.empty(50, dtype=torch.float64))
