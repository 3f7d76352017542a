"""The ES member kernel against an explicit float64 sum, and its build cache."""

import pytest
import torch

from es_serve import member_kernel
from es_serve.member_kernel import member_lora, member_lora_torch


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


def case(rank, seed=0, slots=(0, 4, -1, 2, 2, 3, -1, 1, 0), widths=(6, 3, 3), width_in=7, n_slots=5):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(n_slots, 1, rank, width_in, generator=g) for _ in widths]
    b = [torch.randn(n_slots, 1, w, rank, generator=g) for w in widths]
    x = torch.randn(len(slots), width_in, generator=g)
    y = torch.randn(len(slots), sum(widths), generator=g)
    return y, x, a, b, torch.tensor(slots), widths


@pytest.mark.parametrize("rank", [1, 2, 8])
@pytest.mark.parametrize("impl", [member_lora, member_lora_torch])
def test_matches_float64_sum(rank, impl):
    y, x, a, b, slots, widths = case(rank)
    want = reference(y, x, a, b, slots, widths, 0.5)
    got = y.clone()
    impl(got, x, a, b, slots, widths, 0.5)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    # Tokens without an adapter (slot -1) are left exactly as they were.
    untouched = slots < 0
    assert torch.equal(got[untouched], y[untouched])


def test_compiled_kernel_is_used_here():
    # The machines this project targets have a C compiler; a silent fallback would hide a regression.
    assert member_kernel.load() is not None, member_kernel.load_error()


def test_writes_into_a_strided_output_slice():
    # vLLM hands the layer output as a view; the kernel must honour its row stride.
    y_full, x, a, b, slots, widths = case(1, widths=(4, 4))
    big = torch.zeros(y_full.shape[0], 20)
    big[:, 5:13] = y_full
    view = big[:, 5:13]
    want = reference(view, x, a, b, slots, widths, 1.0)
    member_lora(view, x, a, b, slots, widths, 1.0)
    assert torch.allclose(view.double(), want, atol=1e-5)
    assert torch.all(big[:, :5] == 0) and torch.all(big[:, 13:] == 0)


def test_other_dtypes_fall_back_to_torch():
    y, x, a, b, slots, widths = case(1)
    want = reference(y, x, a, b, slots, widths, 1.0)
    y64 = y.double()
    member_lora(y64, x.double(), [t.double() for t in a], [t.double() for t in b], slots, widths, 1.0)
    assert torch.allclose(y64, want, atol=1e-10)


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
