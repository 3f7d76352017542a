"""`es-serve bench`: ES training throughput as a share of pure inference, beside the peers' ways.

Each (N, r) runs in its own process (benchmarks/case.py says what is measured and how). The ratios
are of medians over interleaved repeats; the JSON keeps every run so the spread can be read.

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
    p.add_argument("--memory-fraction", type=float, default=0.15, help="per engine; two engines run per case")
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

    for r in results:
        base, mem = r["baselines"], r["memory"]
        lines.append(
            f"| {r['population']} | {r['rank']} | {cell(r['pure_tok_s'])} | {cell(r['es_gen_tok_s'])} "
            f"| {cell(r['es_step_tok_s'])} | {r['ratio_generation']:.2f} | {r['ratio_step']:.2f} "
            f"| {base['peft_files_step_tok_s']['median']:.0f} ({r['ratio_peft_files_step']:.2f}) "
            f"| {base['naive_full_rank_tok_s']['median']:.0f} ({r['ratio_naive_full_rank']:.2f}) "
            f"| {mem['member_cache_bytes'] / 2**20:.2f} | {mem['peak_rss_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, mx) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for rank in sorted({r["rank"] for r in results}):
        rows = sorted((r for r in results if r["rank"] == rank), key=lambda r: r["population"])
        ns = [r["population"] for r in rows]
        tag = f" (r={rank})" if len({r["rank"] for r in results}) > 1 else ""
        ax.plot(ns, [r["ratio_generation"] for r in rows], marker="o", label=f"es-serve generation{tag}")
        ax.plot(ns, [r["ratio_step"] for r in rows], marker="s", label=f"es-serve full step{tag}")
        ax.plot(ns, [r["ratio_peft_files_step"] for r in rows], marker="^", label=f"PEFT files, stock LoRA{tag}")
        ax.plot(ns, [r["ratio_naive_full_rank"] for r in rows], marker="x", label=f"naive full-rank ES{tag}")
        mx.plot(ns, [r["memory"]["member_cache_bytes"] / 2**20 for r in rows], marker="o", label=f"member factors{tag}")
        mx.plot(ns, [r["memory"]["lora_slot_bytes"] / 2**20 for r in rows], marker="s", label=f"vLLM LoRA slots{tag}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("population N")
    ax.set_ylabel("tokens/s relative to pure inference")
    ax.set_ylim(0, 1.15)
    ax.grid(alpha=0.3)
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
                    "out": f"{tmp}/case.json",
                }
                print(f"es-serve bench: N={n} r={rank} ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, "-m", "benchmarks.case", json.dumps(spec)])
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark case N={n} r={rank} failed (exit {proc.returncode}); see above")
                row = json.loads(Path(spec["out"]).read_text())
            results.append(row)
            print(
                f"N={n} r={rank}: ratio_generation {row['ratio_generation']:.2f}  ratio_step {row['ratio_step']:.2f}"
                f"  peft files {row['ratio_peft_files_step']:.2f}  naive {row['ratio_naive_full_rank']:.2f}",
                flush=True,
            )
    # The top-level figures are the configuration (N = 32, r = 1) when it was measured.
    first = next((r for r in results if r["population"] == 32 and r["rank"] == 1), results[0])
    meta = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["es-serve bench", *(argv if argv is not None else sys.argv[1:])]),
        "kernel": first["kernel"],
    }
    summary = {k: first[k] for k in ("pure_tok_s", "es_gen_tok_s", "es_step_tok_s", "ratio_generation", "ratio_step")}
    summary["pure_tok_s"] = first["pure_tok_s"]["median"]
    summary["es_gen_tok_s"] = first["es_gen_tok_s"]["median"]
    summary["es_step_tok_s"] = first["es_step_tok_s"]["median"]
    summary["population"], summary["rank"] = first["population"], first["rank"]
    summary["baselines"] = {name: s["median"] for name, s in first["baselines"].items()}
    out.write_text(json.dumps({"meta": meta, **summary, "results": results}, indent=2))
    md = table(results)
    out.with_suffix(".md").write_text(f"`{meta['command']}` ({meta['machine']})\n\n{md}")
    plot(results, out.with_suffix(".png"))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
