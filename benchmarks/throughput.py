"""Generation throughput of an ES population against pure inference, on the same engine.

For each population size N: (a) N x P unperturbed requests, no adapter; (b) the same requests with
N distinct members (fresh adapters every repeat, as a training step without noise reuse has). The
runs alternate a b a b ... so drift on a noisy machine hits both alike; the ratio is of medians.

    python -m benchmarks.throughput --populations 8 32 128 --prompts 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPT_TEXTS = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue in simple words.",
    "List five fruits and describe their colours.",
    "What would you pack for a week of hiking in the mountains?",
    "Describe how a bicycle works.",
    "Give three tips for learning a new language.",
    "Why do cats purr? Explain briefly.",
    "Tell me about the history of the printing press.",
]


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def measure(engine, population, prompts, sampling, repeats: int, seed: int = 0) -> dict:
    from es_serve.types import Generation

    # Counted per generated token: greedy runs can stop early at EOS, so tokens are counted, not assumed.
    pure, es = [], []
    warm = engine.generate_population(Generation(population, seed, 10_000), prompts, sampling)
    engine.generate(prompts * population.size, sampling)
    del warm
    for r in range(repeats):
        start = time.perf_counter()
        out = engine.generate(prompts * population.size, sampling)
        pure.append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - start))
        result = engine.generate_population(Generation(population, seed, r), prompts, sampling)
        es.append(result.tokens / result.seconds)
    p, e = _median_spread(pure), _median_spread(es)
    return {"pure_tok_s": p, "es_gen_tok_s": e, "ratio_generation": e["median"] / p["median"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["population"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(ns, [r["ratio_generation"] for r in results], marker="o", label="ES generation / pure inference")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("population N")
    ax.set_ylabel("throughput ratio")
    ax.set_ylim(0, 1.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--populations", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from es_serve.models import resolve_model

    from adapters import Population
    from es_serve.types import Sampling
    from es_serve.vllm_engine import VLLMEngine

    model_dir = resolve_model(args.model)
    prompts = (PROMPT_TEXTS * (args.prompts // len(PROMPT_TEXTS) + 1))[: args.prompts]
    # Fixed-length outputs: ignore EOS so every configuration generates the same number of tokens.
    sampling = Sampling(max_tokens=args.max_tokens, ignore_eos=True)
    results = []
    for n in args.populations:
        pop = Population(n, args.rank, args.sigma)
        engine = VLLMEngine(model_dir, pop, len(prompts), args.max_tokens, memory_fraction=0.3)
        row = {"population": n, "rank": args.rank, "prompts": len(prompts), "max_tokens": args.max_tokens}
        row.update(measure(engine, pop, prompts, sampling, args.repeats))
        engine.close()
        results.append(row)
        print(
            f"N={n:4d}  pure {row['pure_tok_s']['median']:7.1f} tok/s  es {row['es_gen_tok_s']['median']:7.1f} tok/s"
            f"  ratio {row['ratio_generation']:.2f}",
            flush=True,
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "repeats": args.repeats,
    }
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, out / "throughput.png")
    print("\n| N | pure tok/s (median, min-max) | ES gen tok/s (median, min-max) | ratio |")
    print("|---|---|---|---|")
    for r in results:
        p, e = r["pure_tok_s"], r["es_gen_tok_s"]
        print(
            f"| {r['population']} | {p['median']:.0f} ({p['min']:.0f}-{p['max']:.0f}) | "
            f"{e['median']:.0f} ({e['min']:.0f}-{e['max']:.0f}) | {r['ratio_generation']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
