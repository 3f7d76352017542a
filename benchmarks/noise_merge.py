"""Noise generation and merge cost for the SmolLM2-135M matrices, without loading the model.

For each population size N, in a fresh process per measurement (so one run's allocator state and
peak cannot leak into the next): (a) regenerating every pair's factors for all 210 matrices, as the
merge does; (b) the full merge `apply_update` into float32 master weights. Memory is the peak
resident set above the resident set once the masters are allocated and a one-pair merge has warmed
the kernels up. The analytic columns compare the largest matrix's low-rank noise stack,
N/2 r (m + n) floats, with full-rank noise, N m n floats. (c) The noise versions side by side: one
process regenerates all factors with noise version 1 (torch.randn) and version 2 (platform-exact),
alternating repeat by repeat so both see the same machine load.

    python -m benchmarks.noise_merge --populations 32 256 1024
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LAYERS = 30
# (out, in) per module of SmolLM2-135M: hidden 576, 9 query heads and 3 kv heads of 64, MLP 1536.
SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
MLP = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
MIB = 1024 * 1024


def smollm2_targets(layers: int = LAYERS):
    from adapters import Target

    return [
        Target(layer, module, m, n, f"model.layers.{layer}.{MLP.get(module, 'self_attn')}.{module}.weight")
        for layer in range(layers)
        for module, (m, n) in SHAPES.items()
    ]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    # Writing 5 resets the kernel's high-water mark to the current RSS, so the peak of one phase is
    # not hidden behind an earlier, larger one.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(phase: str, population: int, rank: int, repeats: int, layers: int, threads: int, seed: int = 0) -> dict:
    """One phase ('noise' or 'merge') for one N; meant to run in a fresh process."""
    import torch

    torch.set_num_threads(threads)

    from adapters import Population, apply_update, shape_fitness, stacked_factors

    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("this benchmark reads memory from /proc and needs Linux")
    torch.manual_seed(seed)
    targets = smollm2_targets(layers)
    # In-place scaling: a temporary here would raise the peak before the baseline is taken.
    masters = {t.param: torch.randn(t.out_features, t.in_features).mul_(0.02) for t in targets}
    pop = Population(population, rank, sigma=1e-3)
    shaped = shape_fitness(torch.randn(population), "centered")
    # A one-pair warm-up of the first layer pages in the BLAS kernels and primes the allocator: a
    # one-time cost that is not part of how memory grows with N (reported apart).
    setup = _rss_bytes()
    for t in targets[: len(SHAPES)]:
        if phase == "noise":
            stacked_factors(seed, -1, range(1), t.layer, t.module, t.out_features, t.in_features, rank)
    if phase != "noise":
        apply_update(masters, targets[: len(SHAPES)], Population(2, rank), seed, -1, torch.tensor([1.0, -1.0]), 0.0)
    baseline = _rss_bytes()
    exact = _reset_peak()
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        if phase == "noise":
            for t in targets:
                stacked_factors(seed, repeat, range(pop.draws), t.layer, t.module, t.out_features, t.in_features, rank)
        else:
            apply_update(masters, targets, pop, seed, repeat, shaped, lr=1e-3)
        times.append(time.perf_counter() - start)
    return {
        "times_s": times,
        "peak_above_baseline_bytes": _peak_bytes() - baseline,
        "peak_exact": exact,
        "warmup_growth_bytes": baseline - setup,
        "baseline_rss_bytes": baseline,
        "torch_threads": torch.get_num_threads(),
    }


def compare_versions(population: int, rank: int, repeats: int, layers: int, threads: int, seed: int = 0) -> dict:
    """Seconds to regenerate every pair's factors, per noise version, interleaved; one fresh process."""
    import torch

    torch.set_num_threads(threads)
    from adapters import NOISE_VERSION, Population, stacked_factors
    from adapters.noise import NOISE_VERSIONS
    from adapters.normal import load, load_error

    targets = smollm2_targets(layers)
    pop = Population(population, rank)
    load()
    times = {v: [] for v in NOISE_VERSIONS}
    for repeat in range(repeats + 1):  # round 0 warms both up and is not reported
        for version in NOISE_VERSIONS:
            start = time.perf_counter()
            for t in targets:
                stacked_factors(
                    seed, repeat, range(pop.draws), t.layer, t.module, t.out_features, t.in_features, rank, version
                )
            if repeat:
                times[version].append(time.perf_counter() - start)
    return {
        "times_s": {str(v): ts for v, ts in times.items()},
        "default_version": NOISE_VERSION,
        "compiled_kernel": load_error() is None,
        "torch_threads": torch.get_num_threads(),
    }


def _isolated(*args, fn=None) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn or measure, *args).result()


def analytic(population: int, rank: int, layers: int = LAYERS) -> dict:
    m, n = max(SHAPES.values(), key=lambda s: s[0] * s[1])
    all_mn = layers * sum(a * b for a, b in SHAPES.values())
    all_sum = layers * sum(a + b for a, b in SHAPES.values())
    return {
        "largest_matrix": [m, n],
        "lowrank_stack_bytes": population // 2 * rank * (m + n) * 4,
        "fullrank_noise_bytes": population * m * n * 4,
        "delta_bytes": m * n * 4,
        "model_lowrank_noise_bytes": population // 2 * rank * all_sum * 4,
        "model_fullrank_noise_bytes": population * all_mn * 4,
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def run(populations: list[int], rank: int = 1, repeats: int = 3, layers: int = LAYERS, threads: int = 1) -> dict:
    load_before = os.getloadavg()
    results = []
    for population in populations:
        row = {"population": population, "rank": rank, "pairs": population // 2}
        for phase in ("noise", "merge"):
            got = _isolated(phase, population, rank, repeats, layers, threads)
            row[f"{phase}_s"] = _spread(got.pop("times_s"))
            row[f"{phase}_peak_bytes"] = got.pop("peak_above_baseline_bytes")
            row[f"{phase}_process"] = got
        versions = _isolated(population, rank, repeats, layers, threads, fn=compare_versions)
        row["noise_versions_s"] = {v: _spread(ts) for v, ts in versions.pop("times_s").items()}
        row["noise_versions_process"] = versions
        row["analytic"] = analytic(population, rank, layers)
        results.append(row)
        print(f"N={population}: merge {row['merge_s']['median']:.2f} s", file=sys.stderr)
    return {
        "benchmark": "noise_merge",
        "growth": growth(results),
        "model_shapes": "SmolLM2-135M",
        "layers": layers,
        "modules": SHAPES,
        "repeats": repeats,
        "torch_threads": threads,
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # Other work on a small machine slows every timing; the load average says how busy it was.
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "results": results,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def growth(results: list[dict]) -> dict | None:
    """Least-squares slope of the merge peak per noise draw, against the largest matrix's r (m+n) floats."""
    if len(results) < 2:
        return None
    xs = [r["pairs"] for r in results]
    ys = [r["merge_peak_bytes"] for r in results]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    m, n = results[0]["analytic"]["largest_matrix"]
    per_draw = results[0]["rank"] * (m + n) * 4
    return {"bytes_per_draw": slope, "lowrank_bytes_per_draw": per_draw, "ratio": slope / per_draw}


def markdown(report: dict) -> str:
    lines = [
        "| N | noise gen s (median [min, max]) | merge s (median [min, max]) | merge peak MiB | noise-gen peak MiB "
        "| N/2 r (m+n) 4 B, largest matrix | N m n 4 B (full rank) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        a = row["analytic"]
        cells = [
            str(row["population"]),
            "{median:.3f} [{min:.3f}, {max:.3f}]".format(**row["noise_s"]),
            "{median:.3f} [{min:.3f}, {max:.3f}]".format(**row["merge_s"]),
            f"{row['merge_peak_bytes'] / MIB:.1f}",
            f"{row['noise_peak_bytes'] / MIB:.1f}",
            f"{a['lowrank_stack_bytes'] / MIB:.2f} MiB",
            f"{a['fullrank_noise_bytes'] / MIB:,.0f} MiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| N | noise v1 (torch.randn) s, median [min, max] | noise v2 (platform-exact) s, median [min, max] | v1 / v2 |",
        "| ---: | --- | --- | ---: |",
    ]
    for row in report["results"]:
        v = row["noise_versions_s"]
        lines.append(
            f"| {row['population']} | "
            + " | ".join("{median:.3f} [{min:.3f}, {max:.3f}]".format(**v[k]) for k in ("1", "2"))
            + f" | {v['1']['median'] / v['2']['median']:.2f} |"
        )
    g = report.get("growth")
    if g:
        lines.append(
            f"\nMerge peak grows by {g['bytes_per_draw'] / 1024:.1f} KiB per noise draw (pair) = {g['ratio']:.1f} x "
            f"r (m+n) 4 B of the largest matrix; full-rank noise would add m n 4 B = "
            f"{report['results'][0]['analytic']['delta_bytes'] / MIB:.1f} MiB per member."
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    ns = [r["population"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("noise_s", "noise generation"), ("merge_s", "full merge")):
        med = [r[key]["median"] for r in rows]
        err = [[r[key]["median"] - r[key]["min"] for r in rows], [r[key]["max"] - r[key]["median"] for r in rows]]
        left.errorbar(ns, med, yerr=err, marker="o", capsize=3, label=label)
    left.set(xscale="log", yscale="log", xlabel="population N", ylabel="seconds per step", title="Time (r = 1)")
    right.plot(ns, [r["merge_peak_bytes"] / MIB for r in rows], "o-", label="merge peak above baseline (measured)")
    right.plot(ns, [r["noise_peak_bytes"] / MIB for r in rows], "s-", label="noise-gen peak (measured)")
    right.plot(ns, [r["analytic"]["lowrank_stack_bytes"] / MIB for r in rows], "--", label="N/2 r (m+n) 4 B, largest")
    right.plot(ns, [r["analytic"]["fullrank_noise_bytes"] / MIB for r in rows], ":", label="N m n 4 B, full rank")
    right.set(xscale="log", yscale="log", xlabel="population N", ylabel="MiB", title="Memory")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=LAYERS)
    # One thread by default: vLLM's CPU worker runs torch with one thread, and on a busy 2-core
    # machine a second OpenMP thread turns each small kernel into a multi-millisecond wait.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    bad = [n for n in args.populations if n < 2 or n % 2]
    if bad:
        parser.error(f"populations must be even and >= 2 (antithetic pairs), got {bad}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report = run(args.populations, args.rank, args.repeats, args.layers, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_merge.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "noise_merge.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
