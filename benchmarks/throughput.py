"""`es-serve bench`: ES training throughput as a share of pure inference, beside the peers' ways.

Each (N, r) runs in its own process on one engine (benchmarks/case.py says what is measured and how).
The ratios are of medians over interleaved repeats, shown with the spread of the repeats' own ratios;
the JSON keeps every run, and records the dtype, CPU, threads, versions and the LoRA path that really ran.
With each (N, r) goes the highest generation ratio the members' bytes allow on the machine it ran on
(benchmarks/ceiling.py), so a grid from another CPU says how far its targets are within reach there, and
the machine's GEMM rate with each repeat, so figures from two days can be told apart by what the machine
ran at (on a shared CPU with AMX, it has moved by several times between days).

    es-serve bench --population 8 32 --rank 1 --prompts 4 --max-tokens 64 --json benchmarks/results/throughput.json

`--threads 1 2` runs every (N, r) once per thread count, each on an engine started with that many
compute threads (vLLM's CPU GEMMs bind their threads at engine start, so one engine cannot be re-threaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks import child
from benchmarks.cpus import cpu_cores, cpu_list, pick_cpus

DEFAULT_JSON = "benchmarks/results/throughput.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="es-serve bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="known model name or local HF directory")
    p.add_argument("--population", type=int, nargs="+", default=[8, 32], metavar="N")
    p.add_argument("--rank", type=int, nargs="+", default=[1], metavar="R")
    p.add_argument("--prompts", type=int, default=4, metavar="P")
    p.add_argument("--max-tokens", type=int, default=64, metavar="T")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per configuration")
    p.add_argument("--naive-members", type=int, default=4, help="members timed for naive full-rank ES")
    p.add_argument("--sigma", type=float, default=1e-3)
    p.add_argument("--memory-fraction", type=float, default=0.15, help="of the machine's memory for the engine")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="model dtype; auto = bfloat16 on CPUs with native bf16, else float32",
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        metavar="T",
        help="CPU backend only: run every case once per T, the engine on the first T CPUs this process may use "
        "(default: vLLM's own binding on all of them)",
    )
    p.add_argument("--json", default=DEFAULT_JSON, metavar="OUT.json", help="Markdown and PNG go beside it")
    return p


def check(args) -> None:
    bad = [f"--population {n}" for n in args.population if n < 2 or n % 2]
    bad += [f"--rank {r}" for r in args.rank if not 1 <= r <= 512]
    if bad:
        raise ValueError(f"{', '.join(bad)}: populations must be even and >= 2, ranks in 1..512")
    for name in ("prompts", "max_tokens", "repeats", "naive_members"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        cpus = [cpu for core in cpu_cores() for cpu in core]
        bad = [t for t in args.threads if not 1 <= t <= len(cpus)]
        if bad:
            raise ValueError(
                f"--threads {' '.join(map(str, bad))}: this process may use {len(cpus)} CPUs ({cpu_list(sorted(cpus))}), "
                f"so each T must be in 1..{len(cpus)}"
            )
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise ValueError(
                f"--threads sets the CPU backend's compute threads; vLLM runs on {current_platform.device_name} "
                "here, where it does not apply: drop --threads"
            )


def case_env(threads: int | None) -> tuple[dict, list[int] | None]:
    """The environment and CPUs of a case process whose engine should run on `threads` threads."""
    env = dict(os.environ)
    if threads is None:
        return env, None
    cpus = pick_cpus(threads)
    env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(sorted(cpus))
    env["OMP_NUM_THREADS"] = str(threads)
    # Else vLLM would treat the count as its own choice and drop it after start-up.
    env.pop("VLLM_OMP_NUM_THREADS_SET_BY_VLLM", None)
    return env, cpus


def table(results: list[dict]) -> str:
    lines = [
        "| N | r | threads | pure tok/s | ES generation tok/s | ES step tok/s | ratio gen | LoRA share | ratio step "
        "| PEFT files step (ratio) | naive full-rank (ratio) | member MiB | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(s):
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    def ratio(x, runs=None):
        if x is None:
            return "broken"
        return f"{x:.2f}" if runs is None else f"{x:.2f} ({runs['min']:.2f}-{runs['max']:.2f})"

    def share(x):
        return "broken" if x is None else f"{100 * x:.1f} %"

    notes = []
    for r in results:
        base, mem, runs = r["baselines"], r["memory"], r.get("ratio_per_repeat", {})
        lines.append(
            f"| {r['population']} | {r['rank']} | {r.get('threads', '?')} | {cell(r['pure_tok_s'])} "
            f"| {cell(r['es_gen_tok_s'])} | {cell(r['es_step_tok_s'])} "
            f"| {ratio(r['ratio_generation'], runs.get('generation'))} "
            f"| {share(r.get('lora_share'))} | {ratio(r['ratio_step'], runs.get('step'))} "
            f"| {base['peft_files_step_tok_s']['median']:.0f} ({ratio(r['ratio_peft_files_step'])}) "
            f"| {base['naive_full_rank_tok_s']['median']:.0f} ({ratio(r['ratio_naive_full_rank'])}) "
            f"| {mem['member_cache_bytes'] / 2**20:.2f} | {mem['peak_rss_bytes'] / 2**30:.2f} |"
        )
        notes += [
            f"- N={r['population']} r={r['rank']} {name}: broken measurement, {why}"
            for name, why in r["broken"].items()
        ]
        stock = r.get("pure_vllm_lora_ops_tok_s")
        if stock and r.get("gemm", "vllm") != "vllm":
            notes.append(
                f"- N={r['population']} r={r['rank']}: trained layers on the {r['gemm']} GEMM (pure inference and "
                f"members alike); pure inference on vLLM's own GEMM ran at {cell(stock)} tok/s, against which "
                "the PEFT-file ratio is taken"
            )
        cap = r.get("ceiling_generation")
        if cap:
            notes.append(
                f"- N={r['population']} r={r['rank']}: the members' bytes, {r['member_bytes_per_step'] / 1e6:.1f} MB "
                f"per decode step read at {r['read_rate_gbs']['median']:.1f} GB/s, cap ratio gen at "
                f"{cap['median']:.3f} ({cap['min']:.3f}-{cap['max']:.3f}) here, whatever the kernel does"
            )
        gemm = r.get("gemm_tflops")
        if gemm:
            t, k, m = gemm["shape"]
            notes.append(
                f"- N={r['population']} r={r['rank']}: the machine's GEMM with each repeat, {t} x {k} by {k} x {m} in "
                f"{r['dtype']}: {gemm['median']:.2f} TFLOP/s ({gemm['min']:.2f}-{gemm['max']:.2f})"
            )
        hits = r.get("prefix_cache_hit_tokens")
        if hits:
            notes.append(
                f"- N={r['population']} r={r['rank']}: prompt tokens read from the prefix cache, of "
                f"{hits['prompt_tokens_per_run']} per run: pure {hits['pure']}, members {hits['es_generation']}; "
                f"pure inference sharing the repeated prompts ran at {r['pure_shared_prefixes_tok_s']:.0f} tok/s "
                f"with {hits['pure_shared_prefixes']} cached"
            )
    notes.append(
        "- ratio gen, ratio step: of the medians; in brackets the lowest and highest of the repeats' own ratios, "
        "each run over the pure run of its repeat (what one run resolves on this machine)"
    )
    notes.append(
        "- LoRA share: the fraction of member generation's time spent on top of pure inference, "
        "1 - t_pure / t_generation (1 - ratio gen); threads: torch's compute threads in the engine's process"
    )
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def machine() -> dict:
    """What the figures depend on: CPU model and instruction flags, cores, library versions."""
    import torch
    import vllm

    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_flags": flags.split(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
    }


def _nan(x):
    # A broken measurement is left out of the plot rather than drawn.
    return float("nan") if x is None else x


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, mx) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    drawn = 0
    for rank in sorted({r["rank"] for r in results}):
        rows = sorted((r for r in results if r["rank"] == rank), key=lambda r: r["population"])
        ns = [r["population"] for r in rows]
        tag = f" (r={rank})" if len({r["rank"] for r in results}) > 1 else ""
        for key, marker, label in [
            ("ratio_generation", "o", "es-serve generation"),
            ("ratio_step", "s", "es-serve full step"),
            ("ratio_peft_files_step", "^", "PEFT files, stock LoRA"),
            ("ratio_naive_full_rank", "x", "naive full-rank ES"),
        ]:
            values = [_nan(r[key]) for r in rows]
            if any(v == v for v in values):  # a series of broken measurements is not drawn at all
                # Bars: the lowest and highest of the repeats' own ratios, where the JSON has them.
                runs = [r.get("ratio_per_repeat", {}).get(key.removeprefix("ratio_")) for r in rows]
                low = [max(0.0, v - x["min"]) if x and v == v else 0.0 for v, x in zip(values, runs, strict=True)]
                high = [max(0.0, x["max"] - v) if x and v == v else 0.0 for v, x in zip(values, runs, strict=True)]
                ax.errorbar(ns, values, yerr=[low, high], marker=marker, capsize=3, label=f"{label}{tag}")
                drawn += 1
        mx.plot(ns, [r["memory"]["member_cache_bytes"] / 2**20 for r in rows], marker="o", label=f"member factors{tag}")
        mx.plot(ns, [r["memory"]["lora_slot_bytes"] / 2**20 for r in rows], marker="s", label=f"vLLM LoRA slots{tag}")
    if not drawn:
        ax.text(0.5, 0.5, "no comparable measurement\n(see 'broken' in the JSON)", ha="center", transform=ax.transAxes)
        ax.set_xlim(min(r["population"] for r in results) / 2, max(r["population"] for r in results) * 2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("population N")
    ax.set_ylabel("tokens/s relative to pure inference")
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{results[0]['dtype']}, LoRA path {results[0]['kernel']}", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    mx.set_xscale("log", base=2)
    mx.set_xlabel("population N")
    mx.set_ylabel("MiB")
    mx.set_title("memory for members (r (m + n) numbers per matrix each)", fontsize=9)
    mx.grid(alpha=0.3)
    mx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_threads(results: list[dict], path: Path) -> None:
    """Ratio and LoRA share against the engine's threads, one line per (N, r)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, sx) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for n, rank in sorted({(r["population"], r["rank"]) for r in results}):
        rows = sorted((r for r in results if (r["population"], r["rank"]) == (n, rank)), key=lambda r: r["threads"])
        ts = [r["threads"] for r in rows]
        ax.plot(ts, [_nan(r["ratio_generation"]) for r in rows], marker="o", label=f"N={n} r={rank}")
        sx.plot(ts, [_nan(r["lora_share"]) for r in rows], marker="o", label=f"N={n} r={rank}")
    threads = sorted({r["threads"] for r in results})
    for axis, ylabel in [(ax, "generation tokens/s relative to pure inference"), (sx, "LoRA share of member time")]:
        axis.set_xticks(threads)
        axis.set_xlabel("engine compute threads")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    ax.set_ylim(0, 1.15)
    sx.set_ylim(0, max([0.5, *(r["lora_share"] or 0 for r in results)]) * 1.1)
    ax.set_title(f"{results[0]['dtype']}, LoRA path {results[0]['kernel']}", fontsize=9)
    sx.set_title("1 - t_pure / t_generation: flat when the member kernel scales with the GEMMs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for rank in args.rank:
        for n, threads in [(n, t) for n in args.population for t in args.threads or [None]]:
            env, cpus = case_env(threads)
            label = f"N={n} r={rank}" + ("" if threads is None else f" threads={threads}")
            with tempfile.TemporaryDirectory() as tmp:
                spec = {
                    "model": args.model,
                    "population": n,
                    "rank": rank,
                    "prompts": args.prompts,
                    "max_tokens": args.max_tokens,
                    "repeats": args.repeats,
                    "naive_members": args.naive_members,
                    "sigma": args.sigma,
                    "memory_fraction": args.memory_fraction,
                    "dtype": args.dtype,
                    "cpus": cpus,
                    "out": f"{tmp}/case.json",
                }
                print(f"es-serve bench: {label} ...", file=sys.stderr, flush=True)
                proc = child.run([sys.executable, "-m", "benchmarks.case", json.dumps(spec)], env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark case {label} failed (exit {proc.returncode}); see above")
                row = json.loads(Path(spec["out"]).read_text())
            results.append(row)
            shown = {
                k: "broken" if row[k] is None else f"{row[k]:.2f}"
                for k in ("ratio_generation", "ratio_step", "ratio_peft_files_step", "ratio_naive_full_rank")
            }
            print(
                f"N={n} r={rank} threads {row['threads']} {row['dtype']} kernel {row['kernel']}: ratio_generation {shown['ratio_generation']}"
                f"  ratio_step {shown['ratio_step']}  peft files {shown['ratio_peft_files_step']}"
                f"  naive {shown['ratio_naive_full_rank']}",
                flush=True,
            )
    # The top-level figures are the configuration (N = 32, r = 1) when it was measured.
    first = next((r for r in results if r["population"] == 32 and r["rank"] == 1), results[0])
    host = machine()
    report = first["kernel_report"]
    meta = {
        "model": args.model,
        "machine": f"{host['cpu_model']}, {host['arch']}, {host['cores']} cores",
        "command": " ".join(["es-serve bench", *(argv if argv is not None else sys.argv[1:])]),
        "dtype": first["dtype"],
        "kernel": first["kernel"],
        "kernels": sorted({r["kernel"] for r in results}),
        "threads": report["threads"],
        # One entry per result row, in order: the engine's threads as read back in its process.
        "threads_per_row": [r["threads"] for r in results],
        "kernel_threads_max": report["kernel_threads_max"],
        "bf16_native": report.get("bf16_native"),
        **host,
    }
    summary = {k: first[k] for k in ("pure_tok_s", "es_gen_tok_s", "es_step_tok_s", "ratio_generation", "ratio_step")}
    summary["pure_tok_s"] = first["pure_tok_s"]["median"]
    summary["es_gen_tok_s"] = first["es_gen_tok_s"]["median"]
    summary["es_step_tok_s"] = first["es_step_tok_s"]["median"]
    summary["population"], summary["rank"] = first["population"], first["rank"]
    summary["baselines"] = {name: s["median"] for name, s in first["baselines"].items()}
    out.write_text(json.dumps({"meta": meta, **summary, "results": results}, indent=2))
    md = table(results)
    threads = "/".join(str(t) for t in sorted(set(meta["threads_per_row"])))
    where = f"{meta['machine']}, {meta['dtype']}, {threads} threads, kernel {', '.join(meta['kernels'])}"
    out.with_suffix(".md").write_text(f"`{meta['command']}` ({where})\n\n{md}")
    plot(results, out.with_suffix(".png"))
    if len({r["threads"] for r in results}) > 1:
        plot_threads(results, out.with_name(out.stem + "_threads.png"))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
