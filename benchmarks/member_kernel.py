"""The member kernel alone: one layer's LoRA term against vLLM's CPU LoRA ops and the layer's GEMM.

A decode step of the throughput benchmark's configuration (N = 32 members x P = 4 prompts = 128
tokens, 32 adapter slots) on SmolLM2-135M's fused gate/up projection (576 -> 2 x 1536) and its down
projection (1536 -> 576), at member rank 1 and 4 (vLLM pads rank 4 to its slot rank 8), in float32
and bfloat16, on 1 and 2 threads. Timed, interleaved in blocks so drift hits all alike:
  es      the member kernel as the engine calls it (PunicaWrapperCPU.add_lora_linear after install);
  vllm    vLLM's own PunicaWrapperCPU.add_lora_linear (decode path: bgmv shrink and expand);
  torch   the kernel's pure-torch fallback (what bf16 silently ran before the kernel took bf16);
  gemm    the layer's own GEMM through vLLM's CPU dispatch (oneDNN / sgl prepacked weights);
  gemm+es the GEMM timed while alternating with the kernel: a second thread pool would show here.
The LoRA share is es / gemm: it should stay flat from 1 to 2 threads. Times are wall clock, the
fastest of the interleaved blocks (the least disturbed on a shared machine; medians are kept too).

    python -m benchmarks.member_kernel --json benchmarks/results/member_kernel.json
    python -m benchmarks.member_kernel --cflags=-mno-avx512f --json benchmarks/results/member_kernel_avx2.json

The second times what an AVX2-only CPU compiles, on any x86 CPU with AVX2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

LAYERS = {"gate_up": (576, (1536, 1536)), "down": (1536, (576,))}


def _timer(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6  # microseconds per call


def setup(layer: str, dtype: torch.dtype, rank: int, tokens: int, slots: int, seed: int = 0):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from es_serve.engines import member_kernel

    width_in, widths = LAYERS[layer]
    slot_rank = 1 if rank == 1 else 8  # vLLM's max_lora_rank choices: 1, 8, 16, ...
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for w in widths:
        ta = torch.zeros(slots, 1, slot_rank, width_in, dtype=dtype)
        tb = torch.zeros(slots, 1, w, slot_rank, dtype=dtype)
        ta[:, :, :rank] = (torch.randn(slots, 1, rank, width_in, generator=g) * 0.05).to(dtype)
        tb[:, :, :, :rank] = (torch.randn(slots, 1, w, rank, generator=g) * 0.05).to(dtype)
        a.append(ta)
        b.append(tb)
    a, b = tuple(a), tuple(b)
    x = torch.randn(tokens, width_in, generator=g).to(dtype)
    y = torch.zeros(tokens, sum(widths), dtype=dtype)
    indices = torch.arange(tokens) % slots

    def wrapper():
        p = PunicaWrapperCPU(tokens, slots, "cpu")
        p._token_lora_indices[:tokens] = indices
        p.indices_len[0] = tokens
        p.is_prefill, p.no_lora = False, False
        return p

    stock, ours = wrapper(), wrapper()
    assert member_kernel.install(ours)
    ours._es_slots, ours._es_any = indices.contiguous(), True
    linear = torch.nn.Linear(width_in, sum(widths), bias=False).to(dtype)
    dispatch_cpu_unquantized_gemm(linear, remove_weight=False)

    ops = {
        "es": lambda: ours.add_lora_linear(y, x, a, b, 1.0, widths),
        "vllm": lambda: stock.add_lora_linear(y, x, a, b, 1.0, widths),
        "torch": lambda: member_kernel.member_lora_torch(y, x, a, b, indices, widths, 1.0),
        "gemm": lambda: linear.cpu_linear(x, linear.weight, None),
    }
    # The path the engine would report for this layer, checked before anything is timed.
    ours._es_stats.threads = torch.get_num_threads()
    ops["es"]()
    report = member_kernel.report([ours])
    return ops, report, (y, x, a, b, indices, widths)


def measure(layer, dtype, rank, threads, tokens, slots, blocks, calls, block_ms=20.0) -> dict:
    torch.set_num_threads(threads)
    ops, report, _ = setup(layer, dtype, rank, tokens, slots)
    # Warm-up (first calls allocate and pack), then as many calls per block as fill `block_ms`.
    n_calls = {name: max(2, min(calls, int(block_ms * 1e3 / _timer(fn, 3)))) for name, fn in ops.items()}
    times = {name: [] for name in [*ops, "gemm+es"]}
    for _ in range(blocks):
        for name, fn in ops.items():
            times[name].append(_timer(fn, n_calls[name]))
        # GEMM and kernel alternating as in a layer; only the GEMM's share of the time is kept.
        gemm_only, es = 0.0, ops["es"]
        for _ in range(n_calls["gemm"]):
            es()
            start = time.perf_counter()
            ops["gemm"]()
            gemm_only += time.perf_counter() - start
        times["gemm+es"].append(gemm_only / n_calls["gemm"] * 1e6)
    # The machine is shared: the fastest block is the one least disturbed by other processes, so
    # shares and speedups use it; the median and every block are kept beside it.
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    return {
        "layer": layer,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": rank,
        "threads": threads,
        "tokens": tokens,
        "slots": slots,
        "kernel": report["kernel"],
        "kernel_threads_max": report["kernel_threads_max"],
        "calls_per_block": n_calls,
        "us_per_call": best,
        "us_per_call_median": med,
        "us_runs": times,
        "lora_share_of_gemm": best["es"] / best["gemm"],
        "vllm_lora_share_of_gemm": best["vllm"] / best["gemm"],
        "speedup_vs_vllm": best["vllm"] / best["es"],
        "gemm_slowdown_next_to_kernel": best["gemm+es"] / best["gemm"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 4), dpi=100, squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        sel = [r for r in rows if r["layer"] == layer]
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
        labels = [f"{short[r['dtype']]} r{r['rank']} {r['threads']}thr" for r in sel]
        xs = range(len(sel))
        for k, (name, color) in enumerate([("es", "C0"), ("vllm", "C1"), ("gemm", "grey")]):
            ax.bar(
                [x + (k - 1) * 0.27 for x in xs], [r["us_per_call"][name] for r in sel], 0.27, label=name, color=color
            )
        ax.set_xticks(list(xs), labels, rotation=45, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("microseconds per layer call")
        ax.set_title(f"{layer}: LoRA term (es, vllm) vs the layer's GEMM", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.member_kernel", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per decode step (N x P)")
    p.add_argument("--slots", type=int, default=32, help="adapter slots (members)")
    p.add_argument("--rank", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layer", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--blocks", type=int, default=7, help="interleaved timing blocks per configuration")
    p.add_argument("--calls", type=int, default=200, help="most calls per block (fewer for slow ops: ~20 ms)")
    p.add_argument(
        "--cflags",
        nargs="+",
        default=[],
        metavar="FLAG",
        help="extra compiler flags for the kernel, e.g. -mno-avx512f to time what an AVX2-only CPU runs "
        "(write them as --cflags=-mno-avx512f)",
    )
    p.add_argument("--json", default="benchmarks/results/member_kernel.json")
    args = p.parse_args(argv)
    import vllm

    from benchmarks.throughput import machine
    from es_serve.engines import member_kernel

    if args.cflags:
        # A build of its own, swapped in for this process only (as the tests do for the portable paths).
        try:
            path = member_kernel.build(extra=args.cflags)
        except RuntimeError as err:
            p.error(f"--cflags {' '.join(args.cflags)}: the kernel did not build with them ({err})")
        member_kernel._library, member_kernel._info = member_kernel.open_library(path)

    rows = []
    for layer in args.layer:
        for dtype in args.dtype:
            for rank in args.rank:
                for threads in args.threads:
                    row = measure(
                        layer, getattr(torch, dtype), rank, threads, args.tokens, args.slots, args.blocks, args.calls
                    )
                    rows.append(row)
                    us = row["us_per_call"]
                    print(
                        f"{layer:8s} {dtype:9s} r={rank} threads={threads} [{row['kernel']}]: es {us['es']:.1f} us"
                        f"  vllm {us['vllm']:.1f}  torch {us['torch']:.1f}  gemm {us['gemm']:.1f}"
                        f"  gemm next to es {us['gemm+es']:.1f}  share {row['lora_share_of_gemm']:.3f}",
                        flush=True,
                    )
    meta = {
        "command": " ".join(["python -m benchmarks.member_kernel", *(argv if argv is not None else sys.argv[1:])]),
        "kernel_build": {**member_kernel.kernel_info(), "extra_cflags": args.cflags},
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        **machine(),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
