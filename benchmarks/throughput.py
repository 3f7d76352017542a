"""`es-serve bench`: ES training throughput as a share of pure inference, beside the peers' ways.

Each (N, r) runs in its own process on one engine (benchmarks/case.py says what is measured and how).
The ratios are of medians over interleaved repeats; the JSON keeps every run so the spread can be
read, and records the dtype, CPU, threads, versions and the LoRA path that really ran.

    es-serve bench --population 8 32 --rank 1 --prompts 4 --max-tokens 64 --json benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

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


def table(results: list[dict]) -> str:
    lines = [
        "| N | r | pure tok/s | ES generation tok/s | ES step tok/s | ratio gen | ratio step "
        "| PEFT files step (ratio) | naive full-rank (ratio) | member MiB | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(s):
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    def ratio(x):
        return "broken" if x is None else f"{x:.2f}"

    notes = []
    for r in results:
        base, mem = r["baselines"], r["memory"]
        lines.append(
            f"| {r['population']} | {r['rank']} | {cell(r['pure_tok_s'])} | {cell(r['es_gen_tok_s'])} "
            f"| {cell(r['es_step_tok_s'])} | {ratio(r['ratio_generation'])} | {ratio(r['ratio_step'])} "
            f"| {base['peft_files_step_tok_s']['median']:.0f} ({ratio(r['ratio_peft_files_step'])}) "
            f"| {base['naive_full_rank_tok_s']['median']:.0f} ({ratio(r['ratio_naive_full_rank'])}) "
            f"| {mem['member_cache_bytes'] / 2**20:.2f} | {mem['peak_rss_bytes'] / 2**30:.2f} |"
        )
        notes += [
            f"- N={r['population']} r={r['rank']} {name}: broken measurement, {why}"
            for name, why in r["broken"].items()
        ]
        hits = r.get("prefix_cache_hit_tokens")
        if hits:
            notes.append(
                f"- N={r['population']} r={r['rank']}: prompt tokens read from the prefix cache, of "
                f"{hits['prompt_tokens_per_run']} per run: pure {hits['pure']}, members {hits['es_generation']}; "
                f"pure inference sharing the repeated prompts ran at {r['pure_shared_prefixes_tok_s']:.0f} tok/s "
                f"with {hits['pure_shared_prefixes']} cached"
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
                ax.plot(ns, values, marker=marker, label=f"{label}{tag}")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for rank in args.rank:
        for n in args.population:
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
                    "out": f"{tmp}/case.json",
                }
                print(f"es-serve bench: N={n} r={rank} ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, "-m", "benchmarks.case", json.dumps(spec)])
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark case N={n} r={rank} failed (exit {proc.returncode}); see above")
                row = json.loads(Path(spec["out"]).read_text())
            results.append(row)
            shown = {
                k: "broken" if row[k] is None else f"{row[k]:.2f}"
                for k in ("ratio_generation", "ratio_step", "ratio_peft_files_step", "ratio_naive_full_rank")
            }
            print(
                f"N={n} r={rank} {row['dtype']} kernel {row['kernel']}: ratio_generation {shown['ratio_generation']}"
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
    where = f"{meta['machine']}, {meta['dtype']}, {meta['threads']} threads, kernel {', '.join(meta['kernels'])}"
    out.with_suffix(".md").write_text(f"`{meta['command']}` ({where})\n\n{md}")
    plot(results, out.with_suffix(".png"))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
