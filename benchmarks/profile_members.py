"""Where a member generation's time goes beyond pure inference: a cProfile of one ES generation.

One in-process vLLM engine on SmolLM2 times pure inference (N x P requests, no adapter, no request
sharing another's cached prompt, as members cannot) against member generation (the same requests as N
fresh members), interleaved, at each thread count asked for, with the member kernel's own wall time
(the LoRA term) read from its counters; then it profiles one member generation and reports the
cumulative time of the pieces that pure inference does not pay: putting the members into vLLM's
slots (noise draw, vLLM's LoRAModel, activation), vLLM's per-step adapter bookkeeping, and the
member kernel. The profiler slows Python-heavy parts more than the GEMMs, so read the shares as an
upper bound (the kernel's per-layer pieces are called thousands of times per generation, so their
profiled times are mostly the profiler's). Each timed repeat also records, without the profiler, how
long putting the members into slots took (part of the member generation), the kernel's own time and
its layer plans' re-reading after the slots were written (the kernel's counters), the time of the
per-layer LoRA calls around the kernel (the Python each call costs), and the merge that
follows it (fitness +1 / -1 by member, lr 0, so the weights do not move and every repeat merges the
same amount of work). With each repeat go the machine's GEMM rate (torch's linear on the largest trained
matrix at a decode step's tokens, in the run's dtype) and the ceiling of its generation ratio set by the bytes members
add to every decode step at this machine's read rate, alone and with that repeat's time into slots
(`benchmarks/ceiling.py` says why it bounds any kernel on the default path), and the step's ceiling,
which adds the merge's pieces every merge into the base weights runs (the update's float32 matmul, the
model's GEMM rebuilt on the merged weights; their profiled time per merge).

    python -m benchmarks.profile_members --dtype bfloat16 --threads 1 2 --json benchmarks/results/profile_members.json
    python -m benchmarks.profile_members --dtype bfloat16 --rank 4 --json benchmarks/results/profile_members_r4.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

# (label, file, function) of the pieces reported (cumulative time in the profile).
PIECES = (
    ("members put into slots before the generate (es_prepare)", "vllm_worker.py", "es_prepare"),
    ("  of which: adapters built from seeds for vLLM (draw and layout)", "vllm_worker.py", "_es_build"),
    ("  of which: noise draw", "noise.py", "draw_block"),
    ("  of which: each member's vLLM LoRAModel (es loader)", "vllm_worker.py", "_es_load_adapter"),
    ("  of which: vLLM's LoRAModel registration", "model_manager.py", "_add_adapter"),
    ("  of which: vLLM's activation into slots", "model_manager.py", "activate_adapter"),
    ("  of which: the slots' tensors written (all members at once)", "vllm_worker.py", "_write_queued_slots"),
    ("  of which: members written over the last batch's, in their slots (draw included)", "vllm_worker.py",
     "_es_write_members"),
    ("vLLM's per-step adapter activation (set_active_loras), loading included", "lora_model_runner_mixin.py",
     "set_active_loras"),
    ("member kernel calls (per layer, Python included)", "member_kernel.py", "_run_grouped"),
    ("  of which: the layers' plans re-read after slots were written (used rank, B transposed)",
     "member_kernel.py", "refresh"),
    ("the step's tokens grouped by member (once per engine step)", "member_kernel.py", "update"),
)  # fmt: skip

# The same for a merge (per merge, from a profile of MERGES merges at lr 0, which run every part of one).
MERGE_PIECES = (
    ("merge (es_apply_update)", "vllm_worker.py", "es_apply_update"),
    ("  of which: the update's matmul into the float32 masters", "~", "<method 'addmm_' of 'torch._C.TensorBase' objects>"),
    ("  of which: the update's factors from the held noise", "update.py", "update_factors"),
    ("  of which: the merged masters pushed into the model", "vllm_worker.py", "_es_push"),
    ("    of which: cast to the model dtype", "vllm_worker.py", "_es_layer_weight"),
    ("    of which: vLLM's GEMM rebuilt on them (its weight packing)", "utils.py", "dispatch_cpu_unquantized_gemm"),
)  # fmt: skip
MERGES = 3
# The merge's pieces no merge can skip: the update's matmul and the model's GEMM rebuilt on its weights.
MERGE_FLOOR = (MERGE_PIECES[1][0], MERGE_PIECES[5][0])


def _cumulative(stats: pstats.Stats, filename: str, function: str) -> float:
    # The largest, not the sum: same-named functions of one file can nest (vLLM's LRU manager's
    # activate_adapter calls its base class's), and a sum would count the inner one twice.
    return max(
        (cumtime for (path, _, name), (_, _, _, cumtime, _) in stats.stats.items()
         if path.endswith(filename) and name == function),
        default=0.0,
    )  # fmt: skip


def time_layer_calls(worker, decode_tokens: int) -> None:
    """Runs in the engine's worker: times every call of the LoRA wrappers' per-layer entry point.

    The time outside the C kernel (this total minus the kernel's own counter) is the Python around
    each layer's call; the timing wrapper adds its own few tenths of a microsecond per call. Calls on
    more than `decode_tokens` tokens (N x P, a decode step's batch) are the prompts' prefill.
    """
    totals = worker._es_layer_calls = [0.0, 0, 0.0]  # seconds, calls, of the seconds in prefill

    def wrap(inner):
        def timed(y, x, *args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(y, x, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                totals[0] += seconds
                totals[1] += 1
                if x.shape[0] > decode_tokens:
                    totals[2] += seconds

        return timed

    for punica in worker.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values():
        punica.add_lora_linear = wrap(punica.add_lora_linear)


def read_layer_calls(worker) -> tuple[float, int, float]:
    seconds, calls, prefill = worker._es_layer_calls
    worker._es_layer_calls[:] = [0.0, 0, 0.0]
    return seconds, calls, prefill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_members", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[], help="thread counts to time (default: vLLM's)")
    parser.add_argument("--json", default="benchmarks/results/profile_members.json")
    args = parser.parse_args(argv)
    if args.population < 2 or args.population % 2:
        parser.error(f"--population must be an even number >= 2, got {args.population}")
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be >= 1, got {args.threads}")

    import torch

    from adapters import Population
    from benchmarks import ceiling
    from benchmarks.throughput import machine
    from es_serve.engines.vllm_engine import VLLMEngine
    from es_serve.models import resolve_model
    from es_serve.types import Generation, Sampling

    pop = Population(args.population, args.rank, 5e-3)
    engine = VLLMEngine(resolve_model("smollm2-135m"), pop, args.prompts, args.max_tokens, dtype=args.dtype)
    prepared = []  # seconds of each es_prepare call (the members put into slots)
    rpc = engine._rpc

    def timed_rpc(method, *rpc_args):
        start = time.perf_counter()
        result = rpc(method, *rpc_args)
        if method == "es_prepare":
            prepared.append(time.perf_counter() - start)
        return result

    engine._rpc = timed_rpc
    fitness = torch.tensor([(-1.0) ** i for i in range(pop.size)])
    prompts = [f"What is {a} + {b}?" for a, b in ((3, 4), (10, 7), (8, 15), (2, 19), (6, 6), (1, 9))][: args.prompts]
    sampling = Sampling(max_tokens=args.max_tokens, ignore_eos=True)
    engine.generate(prompts * pop.size, sampling)  # warm-up
    engine.llm.collective_rpc(time_layer_calls, args=(pop.size * args.prompts,))
    step_bytes = ceiling.member_bytes_per_step(engine.targets, pop.draws, pop.rank, engine.dtype)
    largest = ceiling.largest_target(engine.targets)
    default_threads = torch.get_num_threads()
    epoch = 1000
    by_threads = {}
    for threads in args.threads or [default_threads]:
        # The engine runs in this process, so torch's thread count is the one its GEMMs and the member
        # kernel (which reads it every engine step) use.
        torch.set_num_threads(threads)
        engine.generate_population(Generation(pop, 0, epoch, 1), prompts, sampling)  # warm-up at this count
        engine.apply_update(Generation(pop, 0, epoch, 1), fitness, 0.0)  # an engine's first merge plans, once
        epoch += 1
        runs = []
        for rep in range(args.repeats):
            # The read rate with each repeat: on a shared machine it moves between minutes as much as
            # the generations do.
            rate = ceiling.read_rate(threads)
            gemm = ceiling.gemm_rate(
                threads, engine.dtype, pop.size * args.prompts, largest.out_features, largest.in_features
            )
            floor = ceiling.floor_seconds(step_bytes, args.max_tokens, rate)
            # Interleaved, and every member generation in a new noise epoch, as in training.
            t = time.perf_counter()
            engine.generate(prompts * pop.size, sampling, share_prefixes=False)
            pure = time.perf_counter() - t
            report = engine.kernel_report()
            kernel_before, plans_before = report["kernel_seconds"], report.get("plan_seconds", 0.0)
            engine.llm.collective_rpc(read_layer_calls)
            t = time.perf_counter()
            engine.generate_population(Generation(pop, 0, epoch, 1), prompts, sampling)
            members = time.perf_counter() - t
            layer_s, calls, prefill_s = engine.llm.collective_rpc(read_layer_calls)[0]
            report = engine.kernel_report()
            kernel = report["kernel_seconds"] - kernel_before
            plans = report.get("plan_seconds", 0.0) - plans_before
            prep = prepared[-1]
            t = time.perf_counter()
            engine.apply_update(Generation(pop, 0, epoch, 1), fitness, 0.0)
            merge = time.perf_counter() - t
            epoch += 1
            outside_us = 1e6 * (layer_s - kernel) / calls if calls else None
            runs.append(
                {"pure_s": pure, "members_s": members, "ratio": pure / members, "kernel_s": kernel,
                 "kernel_share": kernel / members, "plans_s": plans, "prepare_s": prep, "merge_s": merge,
                 "layer_calls": calls, "layer_calls_s": layer_s, "layer_calls_prefill_s": prefill_s,
                 "outside_kernel_us_per_call": outside_us, "read_rate_gbs": rate / 1e9, "gemm_tflops": gemm / 1e12,
                 "member_floor_s": floor, "ceiling_bytes": ceiling.ratio_ceiling(pure, floor),
                 "ceiling_bytes_slots": ceiling.ratio_ceiling(pure, floor, prep)}
            )  # fmt: skip
            print(
                f"{threads} thread(s), repeat {rep + 1}: pure {pure:.2f} s, members {members:.2f} s, "
                f"ratio {pure / members:.3f}, member kernel {kernel:.3f} s ({100 * kernel / members:.1f} %), "
                f"layer plans re-read {plans:.3f} s, into slots {prep:.3f} s, merge {merge:.3f} s, "
                f"layer calls {layer_s:.3f} s (prefill {prefill_s:.3f} s; "
                f"{outside_us or 0.0:.1f} us each outside the kernel); GEMM {gemm / 1e12:.2f} TFLOP/s, "
                f"read {rate / 1e9:.1f} GB/s; ceiling from the members' bytes "
                f"{ceiling.ratio_ceiling(pure, floor):.3f}, with the slots {ceiling.ratio_ceiling(pure, floor, prep):.3f}",
                flush=True,
            )
        by_threads[str(threads)] = {
            "runs": runs,
            **{f"{key}_median": statistics.median(r[key] for r in runs)
               for key in ("ratio", "kernel_share", "kernel_s", "plans_s", "prepare_s", "merge_s", "layer_calls_s",
                           "layer_calls_prefill_s", "outside_kernel_us_per_call", "read_rate_gbs", "gemm_tflops",
                           "member_floor_s",
                           "ceiling_bytes",
                           "ceiling_bytes_slots")},
        }  # fmt: skip
    torch.set_num_threads(default_threads)
    profile = cProfile.Profile()
    profile.enable()
    engine.generate_population(Generation(pop, 0, 999, 1), prompts, sampling)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt
    pieces = {label: _cumulative(stats, f, fn) for label, f, fn in PIECES}
    profile = cProfile.Profile()
    for k in range(MERGES):
        engine.generate_population(Generation(pop, 0, 1000 + k, 1), prompts, sampling)
        profile.enable()
        engine.apply_update(Generation(pop, 0, 1000 + k, 1), fitness, 0.0)
        profile.disable()
    stats = pstats.Stats(profile)
    merge_pieces = {label: _cumulative(stats, f, fn) / MERGES for label, f, fn in MERGE_PIECES}
    # A step also merges: at least the update's float32 matmul and vLLM's GEMM rebuilt on the new
    # weights, which every merge into the base weights runs whatever the rest of it costs.
    merge_floor = sum(merge_pieces[label] for label in MERGE_FLOOR)
    for entry in by_threads.values():
        entry["merge_floor_s"] = merge_floor
        entry["ceiling_step_median"] = statistics.median(
            ceiling.ratio_ceiling(r["pure_s"], r["member_floor_s"], r["prepare_s"], merge_floor) for r in entry["runs"]
        )
    result = {
        "command": "python -m benchmarks.profile_members " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "dtype": engine.dtype,
        "kernel": engine.lora_kernel,
        "population": pop.size,
        "rank": pop.rank,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "threads": by_threads,
        "member_bytes_per_step": step_bytes,
        "gemm_shape": [pop.size * args.prompts, largest.in_features, largest.out_features],
        "profiled_threads": default_threads,
        "profiled_generation_s": total,
        "pieces_s": pieces,
        "profiled_merges": MERGES,
        "merge_pieces_s": merge_pieces,
    }
    engine.close()
    print(f"profiled member generation: {total:.2f} s ({engine.dtype}, kernel {result['kernel']})")
    for label, seconds in pieces.items():
        print(f"  {label}: {seconds:.3f} s ({100 * seconds / total:.1f} %)")
    print(f"profiled merges ({MERGES}), per merge:")
    for label, seconds in merge_pieces.items():
        print(f"  {label}: {seconds:.3f} s")
    for threads, entry in by_threads.items():
        print(
            f"ceilings at {threads} thread(s), {step_bytes / 1e6:.1f} MB of members per decode step read at "
            f"{entry['read_rate_gbs_median']:.1f} GB/s (medians): generation {entry['ceiling_bytes_median']:.3f} (with the slots "
            f"{entry['ceiling_bytes_slots_median']:.3f}), step {entry['ceiling_step_median']:.3f} "
            f"(measured generation ratio {entry['ratio_median']:.3f})"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
