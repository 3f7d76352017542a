"""The trained layers' GEMM on CPUs with AMX: vLLM's against es-serve's fused one, over one decode step.

SmolLM2-135M's 30 decoder layers, each with its four trained GEMMs (qkv 576 -> 960, o 576 -> 576,
gate/up 576 -> 3072, down 1536 -> 576) and weights of its own (so, as in an engine, a layer's weights
come from memory, not from the caches), at m = 128 and 512 tokens (N = 32 and 128 members x P = 4),
bfloat16, through the same per-layer calls the engine makes:
  vllm          vLLM's GEMM as it dispatches it (oneDNN, or its sgl kernel for small weights): pure inference;
  vllm+kernel   the same, then the member kernel's separate pass (member_kernel.py): members today on
                CPUs without the fused GEMM, and on this one with ES_SERVE_FUSED_GEMM=0;
  fused         es-serve's AMX GEMM (member_gemm.py), no members: pure inference on the engine;
  fused+members the same GEMM with members, as the engine runs it: up to member_kernel.FUSED_MAX_RANK
                each token's term is added in the GEMM's epilogue (the layer's LoRA call then finds it
                done), above it the GEMM runs plain and the member kernel adds the term after it.
Members come in antithetic pairs (the engine's pair claim), at rank 1 and 4. Rounds run every method
once in a shuffled order; medians with min-max, and each method's ratio to `vllm`.

    python -m benchmarks.member_gemm --json benchmarks/results/member_gemm_xeon.json

With --engine, the same comparison in a whole engine instead (SmolLM2-135M, N members x P = 4 prompts,
64 tokens, bfloat16): one engine started with the fused GEMM, whose trained layers are switched between it
and vLLM's GEMM while the member kernel stays installed, pure inference and member generation timed on
each, interleaved, `--repeats` times, and after each member generation a merge (timed; the engine's
first merge under each GEMM is a warm-up):

    python -m benchmarks.member_gemm --engine --population 32 --rank 1 --json benchmarks/results/member_gemm_engine_xeon.json
    python -m benchmarks.member_gemm --engine --population 32 128 --rank 1 4 --repeats 3 \
        --json benchmarks/results/member_gemm_engine_merge_xeon.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

SHAPES = {"qkv": (576, (576, 192, 192)), "o": (576, (576,)), "gate_up": (576, (1536, 1536)), "down": (1536, (576,))}
METHODS = ("vllm", "vllm+kernel", "fused", "fused+members")


def build(tokens: int, rank: int, layers: int, seed: int = 0):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from es_serve.engines import member_gemm, member_kernel

    g = torch.Generator().manual_seed(seed)
    members = tokens // 4
    slot_rank = 1 if rank == 1 else 8  # vLLM's slot ranks: rank 4 is padded to 8 with zero rows
    slots = torch.arange(tokens) // 4
    # Pairs as the engine claims them: slot 2i + 1 holds slot 2i's A and its B negated.
    canon = torch.arange(members) - torch.arange(members) % 2
    punica = PunicaWrapperCPU(tokens, members, "cpu")
    punica._token_lora_indices[:tokens] = slots
    punica.indices_len[0] = tokens
    punica.is_prefill, punica.no_lora = False, False
    assert member_kernel.install(punica)
    calls, stacked = [], []
    for _ in range(layers):
        for name, (width_in, widths) in SHAPES.items():
            linear = torch.nn.Linear(width_in, sum(widths), bias=False).to(torch.bfloat16)
            dispatch_cpu_unquantized_gemm(linear, remove_weight=False)
            linear.output_size_per_partition, linear.input_size_per_partition = sum(widths), width_in
            linear.params_dtype = torch.bfloat16
            a = tuple(torch.zeros(members, 1, slot_rank, width_in, dtype=torch.bfloat16) for _ in widths)
            b = tuple(torch.zeros(members, 1, w, slot_rank, dtype=torch.bfloat16) for w in widths)
            for ak, bk in zip(a, b, strict=True):
                ak[:, :, :rank] = (torch.randn(members, 1, rank, width_in, generator=g) * 0.05).to(torch.bfloat16)
                bk[:, :, :, :rank] = (torch.randn(members, 1, bk.shape[2], rank, generator=g) * 0.05).to(torch.bfloat16)
                ak[1::2].copy_(ak[0::2])
                bk[1::2].copy_(-bk[0::2])
            stacked.append((a, b))
            # What the fused GEMM reads of vLLM's LoRA layer.
            lora = SimpleNamespace(punica_wrapper=punica, lora_a_stacked=a, lora_b_stacked=b, output_slices=widths)
            calls.append((name, linear, lora, widths))
    fused = member_gemm.install([(linear, lora, linear.weight) for _, linear, lora, _ in calls])
    stock = {id(f.base): f.current_stock() for f in fused}
    versions = {id(a): member_kernel.layer_versions(a, b) for a, b in stacked}
    claim = member_kernel.PairClaim(canon, versions)
    member_kernel.set_claim(punica, claim)
    xs = {k: torch.randn(tokens, k, generator=g).to(torch.bfloat16) for k in (576, 1536)}

    def step(method: str) -> None:
        members_on = method in ("vllm+kernel", "fused+members")
        punica._token_lora_indices[:tokens] = slots if members_on else -1
        update_metadata()
        for _, linear, lora, widths in calls:
            x = xs[linear.input_size_per_partition]
            gemm = stock[id(linear)] if method.startswith("vllm") else linear.cpu_linear
            y = gemm(x, linear.weight, None)
            punica.add_lora_linear(y, x, lora.lora_a_stacked, lora.lora_b_stacked, 1.0, widths)

    # In place of install()'s update_metadata, whose vLLM original needs the engine's batch mapping:
    # the same reading of the token indices written above.
    def update_metadata():
        punica._es_slots = punica._token_lora_indices[:tokens].contiguous()
        punica._es_any = bool((punica._es_slots >= 0).any())
        punica._es_stats.threads = torch.get_num_threads()
        if punica._es_any:
            punica._es_groups.update(member_kernel.load(), punica._es_slots, claim, punica._es_stats.threads)

    return step, punica, fused


def measure(tokens: int, rank: int, layers: int, rounds: int) -> dict:
    from es_serve.engines import member_gemm, member_kernel

    step, punica, fused = build(tokens, rank, layers)
    for method in METHODS:  # warm-up: oneDNN builds its kernels per shape on first use
        step(method)
    times = {m: [] for m in METHODS}
    order = random.Random(tokens * 10 + rank)
    for _ in range(rounds):
        methods = list(METHODS)
        order.shuffle(methods)
        for method in methods:
            start = time.perf_counter()
            step(method)
            times[method].append(time.perf_counter() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    report = member_kernel.report([punica])
    return {
        "tokens": tokens,
        "members": tokens // 4,
        "rank": rank,
        "layers": layers,
        "rounds": rounds,
        "step_ms": {m: {"median": med[m] * 1e3, "min": min(v) * 1e3, "max": max(v) * 1e3} for m, v in times.items()},
        "ratio_to_vllm": {m: med[m] / med["vllm"] for m in METHODS},
        "members_cost_vllm_path": med["vllm+kernel"] / med["vllm"] - 1,
        "members_cost_fused_path": med["fused+members"] / med["fused"] - 1,
        "kernel_report": {k: report[k] for k in ("fast_calls", "fallback_calls", "fused_calls", "paired_calls")},
        "gemm_report": member_gemm.report(fused),
    }


def _switch_gemm(worker, fused: bool) -> str:
    """In the engine's worker: the trained layers on the fused GEMM or on vLLM's (member kernel unchanged)."""
    from es_serve.engines import member_gemm

    (member_gemm.reinstate if fused else member_gemm.restore)(worker._es_gemm)
    return member_gemm.report(worker._es_gemm)["gemm"]


def measure_engine(population: int, rank: int, repeats: int, memory_fraction: float) -> dict:
    import os

    os.environ["ES_SERVE_FUSED_GEMM"] = "1"  # the engine's worker reads it when it sets up
    from transformers import AutoTokenizer

    from adapters import Population
    from es_serve.engines.vllm_engine import VLLMEngine
    from es_serve.models import resolve_model
    from es_serve.types import Generation, Sampling
    from rewards import get_task

    model_dir = resolve_model("smollm2-135m")
    pop = Population(population, rank, 1e-3)
    engine = VLLMEngine(model_dir, pop, 4, 64, dtype="bfloat16", memory_fraction=memory_fraction)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The arithmetic task's plain prompts as the trainer sends them to a chat model: one user turn.
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in get_task("arithmetic").sample(4, 0)
    ]
    sampling, short = Sampling(max_tokens=64, ignore_eos=True), Sampling(max_tokens=4, ignore_eos=True)

    def pure() -> float:
        start = time.perf_counter()
        out = engine.generate(prompts * population, sampling)
        return sum(len(c.token_ids) for c in out) / (time.perf_counter() - start)

    def members(epoch: int) -> tuple[float, float]:
        result = engine.generate_population(Generation(pop, 7, epoch), prompts, sampling)
        return result.tokens, result.seconds

    def merge(epoch: int) -> float:
        # Fitness +1 / -1 by member so every part of a merge runs, lr 0 so the weights do not move (as the
        # profile's merges). On the fused GEMM a merge packs its weights only; on vLLM's it rebuilds vLLM's.
        start = time.perf_counter()
        engine.apply_update(Generation(pop, 7, epoch), [(-1.0) ** i for i in range(population)], 0.0)
        return time.perf_counter() - start

    gemms = {}
    for fused in (True, False):  # warm-up on both: oneDNN builds its kernels per shape on first use
        gemms[fused] = engine.llm.collective_rpc(_switch_gemm, args=(fused,))[0]
        engine.generate(prompts * population, short)
        engine.generate_population(Generation(pop, 7, 10**6), prompts, short)
        merge(10**6)  # an engine's first merge plans the weight push and runs the update's GEMMs first (seconds)
    if gemms[True] != "es-amx-bf16":
        raise RuntimeError(f"the engine did not install the fused GEMM ({gemms[True]})")
    keys = ("pure_fused", "members_fused", "generation_and_merge_fused", "pure_vllm", "members_vllm")
    runs = {k: [] for k in (*keys, "generation_and_merge_vllm")}
    merges = {"fused": [], "vllm": []}
    for r in range(repeats):
        for fused in (True, False):
            name = "fused" if fused else "vllm"
            engine.llm.collective_rpc(_switch_gemm, args=(fused,))
            runs[f"pure_{name}"].append(pure())
            tokens, seconds = members(2 * r + fused)
            merges[name].append(merge(2 * r + fused))
            runs[f"members_{name}"].append(tokens / seconds)
            runs[f"generation_and_merge_{name}"].append(tokens / (seconds + merges[name][-1]))
    report = engine.kernel_report()
    engine.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "population": population,
        "rank": rank,
        "prompts": 4,
        "max_tokens": 64,
        "repeats": repeats,
        "tok_s": {k: {"median": med[k], "runs": v} for k, v in runs.items()},
        "merge_s": {g: {"median": statistics.median(v), "runs": v} for g, v in merges.items()},
        "ratio_generation": {g: med[f"members_{g}"] / med[f"pure_{g}"] for g in ("fused", "vllm")},
        # The step's two big parts, generation and merge (reward, shaping and the log excluded) over pure inference.
        "ratio_generation_and_merge": {
            g: med[f"generation_and_merge_{g}"] / med[f"pure_{g}"] for g in ("fused", "vllm")
        },
        "fused_over_vllm": {k: med[f"{k}_fused"] / med[f"{k}_vllm"] for k in ("pure", "members")},
        "kernel_report": {k: report[k] for k in ("kernel", "fused_calls", "gemm_calls_stock", "fallback_calls")},
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    labels = [f"m={r['tokens']} r={r['rank']}" for r in rows]
    for i, method in enumerate(METHODS):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [r["step_ms"][method]["median"] for r in rows],
            width,
            label=method,
        )
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], labels)
    ax.set_ylabel("ms per decode step (120 trained GEMMs)")
    ax.set_title("Trained layers' GEMM, bfloat16: vLLM's vs es-serve's fused AMX GEMM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_engine(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = ("pure_vllm", "members_vllm", "pure_fused", "members_fused")
    for i, key in enumerate(keys):
        ax.bar([j + i * 0.2 for j in range(len(rows))], [r["tok_s"][key]["median"] for r in rows], 0.2, label=key)
    ax.set_xticks([j + 0.3 for j in range(len(rows))], [f"N={r['population']} r={r['rank']}" for r in rows])
    ax.set_ylabel("tok/s (median)")
    ax.set_title("One engine, bfloat16: vLLM's GEMM vs the fused GEMM, interleaved")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rank", type=int, nargs="+", default=[1, 4])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/member_gemm.json"))
    p.add_argument("--engine", action="store_true", help="compare the two GEMMs in a whole engine instead")
    p.add_argument("--population", type=int, nargs="+", default=[32], help="--engine: members N")
    p.add_argument("--repeats", type=int, default=3, help="--engine: interleaved repeats")
    p.add_argument("--memory-fraction", type=float, default=0.15, help="--engine: of the machine's memory")
    args = p.parse_args(argv)
    from es_serve.engines import member_gemm

    from .throughput import machine

    torch.set_num_threads(args.threads)
    if not member_gemm.supported():  # measured whether or not the engine is set to use it
        print("the fused GEMM needs a CPU with AMX bf16: nothing to measure", file=sys.stderr)
        return 2
    rows = []
    if args.engine:
        for population in args.population:
            for rank in args.rank:
                row = measure_engine(population, rank, args.repeats, args.memory_fraction)
                rows.append(row)
                tok = {k: round(v["median"]) for k, v in row["tok_s"].items()}
                g, gm, ms = row["ratio_generation"], row["ratio_generation_and_merge"], row["merge_s"]
                print(f"N={population} r={rank}: tok/s {tok}  ratio generation: fused {g['fused']:.3f}, vLLM's GEMM "
                      f"{g['vllm']:.3f}; with the merge: fused {gm['fused']:.3f}, vLLM's GEMM {gm['vllm']:.3f}; merge s: "
                      f"fused {ms['fused']['median']:.3f}, vLLM's GEMM {ms['vllm']['median']:.3f}", flush=True)  # fmt: skip
    for tokens in [] if args.engine else args.tokens:
        for rank in args.rank:
            row = measure(tokens, rank, args.layers, args.rounds)
            rows.append(row)
            ms = {m: f"{row['step_ms'][m]['median']:.2f}" for m in METHODS}
            print(f"m={tokens} r={rank}: step ms {ms}  members cost: vLLM path {row['members_cost_vllm_path']:+.1%}, "
                  f"fused path {row['members_cost_fused_path']:+.1%}", flush=True)  # fmt: skip
    out = {
        "command": "python -m benchmarks.member_gemm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16",
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    (plot_engine if args.engine else plot)(rows, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
