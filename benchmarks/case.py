"""One (N, r) configuration of the throughput benchmark, measured in a process of its own.

A fresh process per configuration makes its peak memory its own. Every method runs on ONE engine,
so thread binding, KV cache size and memory placement are the same for all of them: the engine
switches between the member kernel and vLLM's own LoRA ops (VLLMEngine.use_kernel), and pure
inference is timed under both. The runs alternate, a b c a' d a b c a' d ..., so drift on a noisy
machine hits all of them alike:
  (a) pure inference: N x P requests, no adapter (member kernel installed), each request with its own
      prefix-cache salt so none reuses another's prompt: members cannot either, their adapter being part
      of the cache key (pure inference sharing the repeated prompts is timed once beside, and the JSON
      counts every method's prefix-cache hits);
  (b) es-serve generation: the same requests as N members (fresh adapters every repeat);
  (c) the full es-serve step (Trainer.train_step: adapters, generation, reward, shaping, merge, log);
  (a') pure inference again with vLLM's own LoRA ops installed;
  (d) the official EGGROLL-vLLM way: PEFT files on tmpfs loaded by path, vLLM's own LoRA ops, then
      the same reward, shaping and merge;
  (e) naive full-rank ES, one member at a time (timed on a few members: its rate does not depend on N).
Every request generates exactly max_tokens (EOS ignored), so all rates count the same tokens.
(b)-(d) do strictly more work than (a) on the same engine; a method whose median beats every pure
run, or a case whose pure runs (a) disagree by more than PURE_SPREAD_MAX, is a broken
measurement and is reported as such (see `flag_broken`), never as a ratio. Beside each ratio of medians,
the spread of the repeats' own ratios (`repeat_ratios`) says what one run could resolve.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# Repeated pure-inference runs on one engine do the same work; runs further apart than this mean
# the machine's load changed under the measurement.
PURE_SPREAD_MAX = 1.25


def flag_broken(method: list[float], pure: list[float]) -> str | None:
    """Why a method's rate cannot be compared with pure inference on this engine, or None.

    `pure` are the runs the ratio divides by: pure inference with the member kernel installed, which
    skips the LoRA term for adapter-free batches. (Pure inference under vLLM's own LoRA ops is
    slower, as those ops still run on every layer; it is reported beside, not used as a control.)
    """
    if max(pure) > PURE_SPREAD_MAX * min(pure):
        return (
            f"pure-inference runs on this engine range from {min(pure):.0f} to {max(pure):.0f} tok/s "
            f"(more than {PURE_SPREAD_MAX:.2f}x apart): the machine was not quiet enough to compare"
        )
    if statistics.median(method) > max(pure):
        return (
            f"median {statistics.median(method):.0f} tok/s beats every pure-inference run "
            f"(max {max(pure):.0f}) on the same engine: the engine or the machine changed between runs"
        )
    return None


def repeat_ratios(method: list[float], pure: list[float]) -> dict | None:
    """Each repeat's run of a method over the pure run of the same repeat, as a spread.

    The headline ratio is of medians; these show how far single repeats stray from it, i.e. what one
    run of the bench can resolve on this machine. A pure run and the method's run of one repeat lie
    seconds apart, so load that drifts over minutes shifts both alike. None when the counts differ
    (naive ES times a few members, not one per repeat).
    """
    if len(method) != len(pure) or not method:
        return None
    return spread([m / p for m, p in zip(method, pure, strict=True)])


def pure_baseline(method: str, gemm: str, pure: list[float], pure_stock: list[float]) -> list[float]:
    """The pure-inference runs a method's ratio is taken against: those on the same GEMM.

    The PEFT files run on vLLM's GEMM and LoRA ops (use_kernel("vllm")); where the engine's trained
    layers run on the fused GEMM (`gemm` != "vllm", member_gemm.py), they are measured against pure
    inference on that stock path (`pure_stock`), every other method against the engine's own (`pure`).
    """
    return pure_stock if method == "peft_files_step" and gemm != "vllm" else pure


def lora_share(pure_tok_s: float, generation_tok_s: float) -> float:
    """The fraction of member-generation time spent on top of pure inference for the same tokens.

    1 - t_pure / t_generation over the medians, i.e. 1 - generation rate / pure rate (1 - ratio_generation):
    0 when members cost nothing over pure inference, 0.25 when a quarter of their time is the LoRA term
    and the adapters' upkeep.
    """
    return 1.0 - generation_tok_s / pure_tok_s


def engine_threads(worker) -> dict:
    """Run inside the process that runs the model: the compute threads and CPUs it really got."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0))}


def pin(cpus: list[int]) -> None:
    """Confines this process (and the engine it starts) to `cpus`, one compute thread on each.

    Must run before the engine starts: vLLM's CPU GEMMs bind their threads then, and setting torch's
    thread count later does not change them. VLLM_CPU_OMP_THREADS_BIND and OMP_NUM_THREADS (set by the
    parent) cover an engine started in a worker process of its own.
    """
    import torch

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SamePrompts:
    """A task whose every step samples the same rows, so (c) generates exactly what (a) and (b) do."""

    def __init__(self, task, rows):
        self.task, self.rows = task, rows

    def sample(self, n, step):
        return self.rows

    def __getattr__(self, name):
        return getattr(self.task, name)


def run_case(spec: dict) -> dict:
    from adapters import Population, shape_fitness
    from es_serve.config import validate
    from es_serve.engines.vllm_engine import VLLMEngine
    from es_serve.models import resolve_model
    from es_serve.trainer import Trainer
    from es_serve.types import Generation, Sampling
    from rewards import get_task, load_reward

    from .ceiling import floor_seconds, gemm_rate, largest_target, member_bytes_per_step, ratio_ceiling, read_rate
    from .peers import PeftFileStep, naive_member

    n, rank, p, tokens = spec["population"], spec["rank"], spec["prompts"], spec["max_tokens"]
    config = validate(
        {
            "model": {"name": spec["model"]},
            "es": {"population": n, "rank": rank, "sigma": spec["sigma"], "lr": 1e-3},
            "task": {"name": "arithmetic", "prompts_per_step": p},
            "generation": {"max_tokens": tokens, "ignore_eos": True},
            # No evaluation or checkpoint inside the timed steps.
            "train": {"steps": 1_000_000, "eval_every": 1_000_000, "checkpoint_every": 1_000_000},
        }
    )
    model_dir = resolve_model(spec["model"])
    if spec.get("cpus"):
        pin(spec["cpus"])
    pop = Population(n, rank, spec["sigma"])
    engine = VLLMEngine(
        model_dir, pop, p, tokens, dtype=spec.get("dtype", "auto"), memory_fraction=spec["memory_fraction"]
    )
    # Read back from the model's process after the engine started, not echoed from the request.
    ran_on = engine.llm.collective_rpc(engine_threads)[0]
    task = get_task("arithmetic")
    reward = load_reward(task.default_reward)
    run = tempfile.mkdtemp(prefix="es-bench-run-")
    trainer = Trainer(config, Path(run) / "run", engine, task, reward)
    trainer.start(resume=False)
    rows = task.sample(p, 0)
    prompts = [trainer.render(r) for r in rows]
    trainer.task = SamePrompts(task, rows)
    sampling = Sampling(max_tokens=tokens, ignore_eos=True)
    peft = PeftFileStep(engine)

    cached = {"pure": 0, "pure_shared_prefixes": 0, "generation": 0}

    def pure(share_prefixes=False):
        # Each request gets its own prefix-cache salt: the N copies of a prompt are computed N times,
        # as the N members' must be (a member's adapter is part of its cache key).
        start = time.perf_counter()
        out = engine.generate(prompts * n, sampling, share_prefixes=share_prefixes)
        rate = sum(len(c.token_ids) for c in out) / (time.perf_counter() - start)
        cached["pure_shared_prefixes" if share_prefixes else "pure"] += engine.last_cached_tokens
        return rate

    def es_generation(epoch):
        result = engine.generate_population(Generation(pop, 7, epoch), prompts, sampling)
        cached["generation"] += engine.last_cached_tokens
        return result.tokens / result.seconds

    def es_step():
        report = trainer.train_step()
        return report.record["gen_tokens"] / report.record["step_seconds"]

    def peft_step(epoch):
        start = time.perf_counter()
        gen = Generation(pop, 7, 100_000 + epoch)
        completions, count, _, gen_seconds = peft.generate(gen, prompts, sampling)
        scored = reward.score(prompts, [[c.text for c in row] for row in completions], trainer.columns(rows))
        shaped = shape_fitness(scored.matrix, "centered", n, valid=scored.valid)
        engine.apply_update(gen, shaped, 1e-3)
        return count / (time.perf_counter() - start), count / gen_seconds

    # Warm-up at the timed batch size under both LoRA paths: oneDNN builds its GEMM kernels per
    # batch shape on first use, which would otherwise land in whichever run comes first.
    short = Sampling(max_tokens=4, ignore_eos=True)
    engine.generate(prompts * n, short)
    engine.generate_population(Generation(pop, 7, 10**6), prompts, short)
    engine.use_kernel("vllm")
    engine.generate(prompts * n, short)
    peft.generate(Generation(pop, 7, 10**6), prompts, short)
    engine.use_kernel("es")
    # The engine's first merge plans how merged weights reach the model, builds new GEMM kernels and
    # runs the update's float32 GEMMs for the first time (about a second here, once per engine):
    # warmed up like the GEMMs, and reported beside. Non-zero fitness so every part of a merge runs;
    # lr 0 so the weights do not move.
    start = time.perf_counter()
    engine.apply_update(Generation(pop, 7, 10**6), [(-1.0) ** i for i in range(n)], 0.0)
    first_merge = time.perf_counter() - start

    a, a_stock, b, c, d_step, d_gen, rates, gemms = [], [], [], [], [], [], [], []
    largest = largest_target(engine.targets)
    for r in range(spec["repeats"]):
        # With each repeat: the machine moves between them.
        rates.append(read_rate(ran_on["torch_threads"]))
        gemms.append(gemm_rate(ran_on["torch_threads"], engine.dtype, n * p, largest.out_features, largest.in_features))
        a.append(pure())
        b.append(es_generation(r))
        c.append(es_step())
        engine.use_kernel("vllm")
        a_stock.append(pure())
        step_rate, gen_rate = peft_step(r)
        engine.use_kernel("es")
        d_step.append(step_rate)
        d_gen.append(gen_rate)
        print(
            f"  N={n} r={rank} repeat {r + 1}: pure {a[-1]:.0f}  es gen {b[-1]:.0f}  es step {c[-1]:.0f}  "
            f"pure (vLLM LoRA ops) {a_stock[-1]:.0f}  peft files step {d_step[-1]:.0f} tok/s",
            file=sys.stderr,
            flush=True,
        )
    # Pure inference as a server would run these repeated prompts, sharing their cached prefixes:
    # reported beside the comparison, once (on the CPU backend a block holds 128 tokens, so prompts
    # shorter than that share nothing and this equals (a)).
    shared = pure(share_prefixes=True)
    memory = engine.memory()
    kernel, kernel_report = engine.lora_kernel, engine.kernel_report()

    naive, members = [], min(n, spec["naive_members"])
    base = engine.state_dict()
    for i in range(members):
        count, seconds = naive_member(engine, base, i, spec["sigma"], prompts, sampling, seed=7)
        naive.append(count / seconds)
    del base
    # No close(): this process ends here anyway.

    pa, pb, pc = spread(a), spread(b), spread(c)
    targets = engine.targets
    per_member = rank * sum(t.out_features + t.in_features for t in targets)
    methods = {"generation": b, "step": c, "peft_files_step": d_step, "naive_full_rank": naive}
    gemm = kernel_report.get("gemm", "vllm")
    pure_of = {name: pure_baseline(name, gemm, a, a_stock) for name in methods}
    broken = {name: why for name, runs in methods.items() if (why := flag_broken(runs, pure_of[name]))}

    def ratio(name):
        return None if name in broken else statistics.median(methods[name]) / statistics.median(pure_of[name])

    per_repeat = {name: repeat_ratios(methods[name], pure_of[name]) for name in methods if name not in broken}
    # How high the generation ratio can go here whatever the kernel does (benchmarks/ceiling.py): each
    # repeat's pure run against the time its decode steps need to read the members' bytes at that
    # repeat's read rate. Every request generates exactly `tokens` tokens (EOS ignored).
    step_bytes = member_bytes_per_step(targets, pop.draws, rank, engine.dtype)
    ceilings = [
        ratio_ceiling(n * p * tokens / rate_a, floor_seconds(step_bytes, tokens, rate))
        for rate_a, rate in zip(a, rates, strict=True)
    ]

    return {
        **{k: spec[k] for k in ("population", "rank", "prompts", "max_tokens", "repeats")},
        "threads": ran_on["torch_threads"],
        "threads_requested": len(spec["cpus"]) if spec.get("cpus") else None,
        "cpus": ran_on["cpus"],
        "dtype": engine.dtype,
        "kernel": kernel,
        "gemm": kernel_report.get("gemm", "vllm"),
        "kernel_report": kernel_report,
        "pure_tok_s": pa,
        "pure_vllm_lora_ops_tok_s": spread(a_stock),
        "pure_shared_prefixes_tok_s": shared,
        "prefix_cache_hit_tokens": {
            "pure": cached["pure"],
            "pure_shared_prefixes": cached["pure_shared_prefixes"],
            "es_generation": cached["generation"],
            "prompt_tokens_per_run": n * sum(len(engine.encode(q)) for q in prompts),
        },
        "es_gen_tok_s": pb,
        "es_step_tok_s": pc,
        "ratio_generation": ratio("generation"),
        "ratio_step": ratio("step"),
        "lora_share": None if "generation" in broken else lora_share(pa["median"], pb["median"]),
        "baselines": {
            "peft_files_step_tok_s": spread(d_step),
            "peft_files_gen_tok_s": spread(d_gen),
            "naive_full_rank_tok_s": {**spread(naive), "members_timed": members},
        },
        "first_merge_seconds": first_merge,
        "ratio_peft_files_step": ratio("peft_files_step"),
        "ratio_naive_full_rank": ratio("naive_full_rank"),
        "ratio_per_repeat": {name: runs for name, runs in per_repeat.items() if runs is not None},
        "ceiling_generation": spread(ceilings),
        "member_bytes_per_step": step_bytes,
        "read_rate_gbs": spread([rate / 1e9 for rate in rates]),
        # torch's GEMM on the largest trained matrix at a decode step's N x P tokens, in the run's dtype
        "gemm_tflops": {
            **spread([rate / 1e12 for rate in gemms]),
            "shape": [n * p, largest.in_features, largest.out_features],
        },
        "broken": broken,
        "memory": {
            **memory,
            "numbers_per_member": per_member,
            "numbers_per_member_full_rank": sum(t.out_features * t.in_features for t in targets),
            "peak_rss_bytes": peak_rss_bytes(),
        },
    }


if __name__ == "__main__":
    from benchmarks.child import end_with_parent  # first, before the case's imports take seconds

    end_with_parent()
    spec = json.loads(sys.argv[1])
    result = run_case(spec)
    Path(spec["out"]).write_text(json.dumps(result, indent=2))
