"""How high a member generation's ratio to pure inference can go on this machine, from the bytes members add.

Every decode step of a member generation reads each noise draw's factors, r (m + n) numbers per trained
matrix (a pair's two members share them), on top of the model's weights. Those rows do not stay in cache
between steps: the step's pass over the weights (hundreds of MB) evicts them. On the default path the
member term runs as its own pass after vLLM's GEMM, so reading them cannot overlap the GEMM, and no
kernel can take less time than reading them at the rate this machine streams memory. So

    generation >= pure + max_tokens * member bytes per step / read rate (+ putting members into slots)

and pure / that is a ceiling for the generation ratio whatever the kernel does. The read rate is
measured here (torch's sum over a buffer larger than any cache, the thread count of the run), as no
library reports it; the bytes are counted from the engine's trained matrices.
"""

from __future__ import annotations

import statistics
import time


def member_bytes_per_step(targets, draws: int, rank: int, dtype: str) -> int:
    """Bytes of member factors one decode step reads: r (m + n) per trained (m, n) matrix and draw, in the
    engine's dtype (`targets`: the engine's, each with out_features m and in_features n)."""
    import torch

    if draws < 1 or rank < 1:
        raise ValueError(f"draws and rank must be >= 1, got {draws} and {rank}")
    element_size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return draws * rank * element_size * sum(t.out_features + t.in_features for t in targets)


def _median_seconds(threads: int, call, repeats: int, warmups: int) -> float:
    """Median wall time of `call()` on `threads` of torch's threads, after `warmups` untimed calls (pages
    touched, kernels built, threads started); torch's thread count is put back as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmups):
            call()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return statistics.median(seconds)


def read_rate(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second a streaming read gets here on `threads` threads (median of `repeats` passes)."""
    import torch

    buffer = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    return buffer.nbytes / _median_seconds(threads, buffer.sum, repeats, warmups=1)


def gemm_rate(threads: int, dtype: str, tokens: int, out_features: int, in_features: int, repeats: int = 30) -> float:
    """Floating-point operations per second torch's linear reaches here on a (tokens, in) by (in, out) product in
    `dtype` on `threads` threads (median of `repeats`, the weights in cache).

    Pure inference is mostly the model's GEMMs, and on a shared machine their rate moves between days, on
    CPUs with AMX by over two times; the ceiling above rises as pure inference slows. Recorded with each
    repeat, it says which machine a day's ratios and ceilings come from. torch's linear runs the oneDNN (or,
    in float32 without AMX, BLAS) kernels vLLM's CPU GEMMs use.
    """
    import torch

    if min(tokens, out_features, in_features, repeats) < 1:
        raise ValueError(
            f"tokens, features and repeats must be >= 1, got {tokens}, {out_features}, {in_features}, {repeats}"
        )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator).to(getattr(torch, dtype))
    weight = torch.randn(out_features, in_features, generator=generator).to(x.dtype)
    seconds = _median_seconds(threads, lambda: torch.nn.functional.linear(x, weight), repeats, warmups=3)
    return 2 * tokens * out_features * in_features / seconds


def largest_target(targets):
    """The engine's trained matrix with the most weights (where a decode step's GEMMs spend most)."""
    return max(targets, key=lambda t: t.out_features * t.in_features)


def floor_seconds(bytes_per_step: int, steps: int, rate: float) -> float:
    """The least time reading the members' bytes adds to a generation of `steps` decode steps."""
    return bytes_per_step * steps / rate


def ratio_ceiling(pure_s: float, *added_s: float) -> float:
    """pure / (pure + what members add at least)."""
    return pure_s / (pure_s + sum(added_s))
