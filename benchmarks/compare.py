"""`es-serve compare`: es-serve against TRL's GRPOTrainer on the same job and the same wall-clock budget.

Both methods train the same model on the same task and reward, from es-serve's stream of training
prompts, for the same minutes of training (evaluation pauses the clock and is reported on its own),
on the same CPUs and thread count, each in a process of its own. Every k minutes the current weights
answer es-serve's held-out rows greedily through one shared float32 evaluator (benchmarks/compare_eval.py),
so the curves start from identical per-prompt scores. GRPO runs once per learning rate; the best is
reported beside es-serve. Writes JSON, a Markdown table and a PNG.

    es-serve compare --minutes 8 --eval-every-minutes 2 --grpo-lrs 3e-6 1e-5 3e-5
    es-serve compare --set task.name=countdown --set reward.fn=countdown
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks import child
from benchmarks.cpus import cpu_cores, pick_cpus

GRPO_OWN = {
    "learning_rate": "--grpo-lrs",
    "max_completion_length": "generation.max_tokens",
    "output_dir": "the command",
    "use_cpu": "the command",
}
GENERATION_NOTE = (
    "transformers generate() inside GRPOTrainer (TRL's default, use_vllm=False); TRL's vLLM colocate mode "
    "is not an option on CPU"
)
EVALUATOR_NOTE = (
    "one shared evaluator for every method: the held-out rows es-serve's Trainer evaluates, rendered by it, "
    "answered greedily by a float32 transformers copy of the model holding the method's current weights, "
    "scored by es-serve's reward call"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="es-serve compare", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="es-serve TOML configuration (as for es-serve train)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="es-serve configuration override, as for es-serve train (train.* is set by the budget)",
    )
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget of every run")
    p.add_argument("--eval-every-minutes", type=float, default=2.0, help="held-out evaluation period (training time)")
    p.add_argument(
        "--grpo-lrs",
        type=float,
        nargs="+",
        default=[3e-6, 1e-5, 3e-5],
        metavar="LR",
        help="GRPO learning rates, one run each",
    )
    p.add_argument(
        "--grpo-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="GRPO precision: bfloat16 autocast over float32 weights, or float32; auto = bfloat16 on "
        "CPUs with native bf16 instructions, else float32",
    )
    p.add_argument(
        "--grpo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other GRPOConfig field, e.g. per_device_train_batch_size=16",
    )
    p.add_argument("--threads", type=int, help="CPU threads of every run (default: one per physical core available)")
    p.add_argument("--skip-es", action="store_true", help="GRPO runs only (es-serve's run is left out)")
    p.add_argument("--out", metavar="OUT.json", help="default benchmarks/results/compare_<task>.json; .md, .png beside")
    p.add_argument("--work", metavar="DIR", help="keep the runs' directories and logs here (default: a temporary one)")
    p.add_argument("--verbose", action="store_true", help="show the runs' own output instead of logging it")
    return p


def _fail_if(condition: bool, message: str) -> None:
    if condition:
        raise ValueError(message)


def check(args) -> dict:
    """Every argument, before any run starts; returns what the runs need. Errors are one-line ValueErrors."""
    _fail_if(not args.minutes > 0, f"--minutes must be a positive number of minutes, got {args.minutes:g}")
    _fail_if(not args.eval_every_minutes > 0, f"--eval-every-minutes must be positive, got {args.eval_every_minutes:g}")
    _fail_if(any(not lr > 0 for lr in args.grpo_lrs), f"--grpo-lrs must be positive, got {args.grpo_lrs}")
    available = cpu_cores()
    if args.threads is not None:
        _fail_if(
            not 1 <= args.threads <= sum(len(c) for c in available),
            f"--threads must be between 1 and the {sum(len(c) for c in available)} CPUs available, got {args.threads}",
        )
    from es_serve.config import ConfigError, load_config, parse_override
    from es_serve.models import resolve_model
    from rewards import load_reward, task_from_config

    config = load_config(args.config, args.overrides)
    if config.task.dataset and not config.reward.fn:
        raise ConfigError("a dataset task has no default reward: set reward.fn (as for es-serve train)")
    task = task_from_config(config.task)
    load_reward(config.reward.fn or task.default_reward, weights=config.reward.weights)
    task.eval_rows(config.task.eval_prompts)  # more eval prompts than the task holds out fails here
    grpo_set = {}
    fields = {f.name for f in dataclasses.fields(_grpo_config_class())}
    for item in args.grpo_set:
        keys, value = parse_override(item)
        key = ".".join(keys)
        _fail_if(key not in fields, f"--grpo-set {item}: {key!r} is not a GRPOConfig field")
        _fail_if(key in GRPO_OWN, f"--grpo-set {item}: {key} is set by {GRPO_OWN[key]}")
        grpo_set[key] = value
    return {"config": config, "task": task, "model_dir": resolve_model(config.model.name), "grpo_set": grpo_set}


def _grpo_config_class():
    install = "pip install 'trl==1.16.0' (it comes with es-serve's test extra)"
    if importlib.util.find_spec("trl") is None:
        raise ValueError(f"TRL is not installed, and the GRPO runs go through its GRPOTrainer: {install}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL warns about vLLM versions it was not tested with
            from trl.trainer.grpo_config import GRPOConfig
    except ImportError as exc:
        if getattr(exc, "name", None) == "trl":
            raise ValueError(f"TRL is not installed, and the GRPO runs go through its GRPOTrainer: {install}") from None
        raise ValueError(f"TRL does not import ({type(exc).__name__}: {exc}); reinstall it: {install}") from None
    return GRPOConfig


def run_one(spec: dict, work: Path, verbose: bool, env: dict) -> dict:
    spec["out"] = str(work / f"{spec['name']}.json")
    log = work / f"{spec['name']}.log"
    cmd = [sys.executable, "-m", "benchmarks.compare_runs", json.dumps(spec)]
    started = time.perf_counter()
    if verbose:
        proc = child.run(cmd, env=env)
    else:
        with open(log, "w") as out:
            proc = child.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "" if verbose else "\n" + "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"the {spec['name']} run failed (exit {proc.returncode}){tail}")
    result = json.loads(Path(spec["out"]).read_text())
    result["process_seconds"] = time.perf_counter() - started
    return result


def summarise(run: dict) -> dict:
    from benchmarks.compare_eval import paired

    first, last = run["evals"][0], run["evals"][-1]
    gen = run["gen_seconds"]
    return {
        "label": run["label"],
        "method": run["method"],
        "lr": run["lr"],
        "first": first["mean"],
        "last": last["mean"],
        "last_stderr": last["stderr"],
        "change": paired(first["per_prompt"], last["per_prompt"]),
        "steps": run["steps"],
        "completions": run["completions"],
        "train_minutes": run["train_seconds"] / 60,
        "eval_minutes": run["eval_seconds"] / 60,
        "median_step_seconds": run["step_seconds"]["median"] if run["step_seconds"] else None,
        "completions_per_train_second": run["completions"] / run["train_seconds"] if run["train_seconds"] else None,
        "gen_tok_s": run["gen_tokens"] / gen if gen else None,
        "peak_rss_bytes": run["peak_rss_bytes"],
    }


def report(runs: list[dict], meta: dict) -> dict:
    from benchmarks.compare_eval import paired

    summary = [summarise(r) for r in runs]
    grpo = [s for s in summary if s["method"] == "grpo"]
    best = max(grpo, key=lambda s: s["last"] if s["last"] is not None else float("-inf")) if grpo else None
    es = next((s for s in summary if s["method"] == "es-serve"), None)
    head = None
    if es and best:
        es_run = next(r for r in runs if r["label"] == es["label"])
        grpo_run = next(r for r in runs if r["label"] == best["label"])
        # Same prompts, so the final scores pair up prompt by prompt.
        head = {
            "es_serve_minus_best_grpo": paired(grpo_run["evals"][-1]["per_prompt"], es_run["evals"][-1]["per_prompt"])
        }
    return {
        "meta": meta,
        "summary": summary,
        "best_grpo": best["label"] if best else None,
        "head_to_head": head,
        "runs": runs,
    }


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _num(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}; {_threads(meta['threads'])} on CPUs {meta['cpus']}; model {meta['model']}; task "
        f"{meta['task']} ({meta['eval_prompts']} held-out prompts); budget {meta['minutes']:g} min of training "
        f"per run; eval every {meta['eval_every_minutes']:g} min (not counted).",
        "",
        "| run | dtype | steps | completions | s/step (median) | gen tok/s | eval at 0 | final (± s.e.) "
        "| gain (± paired s.e.) | better / worse | train min | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, run in zip(data["summary"], data["runs"], strict=True):
        change = s["change"] or {}
        best = " (best GRPO)" if s["label"] == data["best_grpo"] and len(data["summary"]) > 2 else ""
        gain = f"{change['gain']:+.3f} ± {change['paired_stderr']:.3f}" if change else "-"
        lines.append(
            f"| {s['label']}{best} | {run['dtype']} | {s['steps']} | {s['completions']} "
            f"| {_num(s['median_step_seconds'], '{:.2f}')} | {_num(s['gen_tok_s'], '{:.0f}')} | {_num(s['first'])} "
            f"| {_num(s['last'])} ± {_num(s['last_stderr'])} | {gain} "
            f"| {change.get('better', '-')} / {change.get('worse', '-')} | {s['train_minutes']:.2f} "
            f"| {s['peak_rss_bytes'] / 2**30:.2f} |"
        )
    head = (data.get("head_to_head") or {}).get("es_serve_minus_best_grpo")
    if head:
        lines += [
            "",
            f"es-serve minus {data['best_grpo']} on the final evaluation, paired by prompt: "
            f"{head['gain']:+.3f} ± {head['paired_stderr']:.3f} (es-serve better on {head['better']}, "
            f"worse on {head['worse']} of {head['prompts']} prompts).",
        ]
    lines += ["", "Held-out reward (± s.e.) by training minutes:", ""]
    for run in data["runs"]:
        points = ", ".join(f"{e['minutes']:.2f} min: {_num(e['mean'])} ± {_num(e['stderr'])}" for e in run["evals"])
        lines.append(f"- {run['label']}: {points}")
    lines += ["", f"GRPO generation: {meta['grpo_generation']}.", f"Evaluation: {meta['evaluator']}."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for run in data["runs"]:
        xs = [e["minutes"] for e in run["evals"]]
        ys = [float("nan") if e["mean"] is None else e["mean"] for e in run["evals"]]
        err = [0.0 if e["stderr"] is None else e["stderr"] for e in run["evals"]]
        es = run["method"] == "es-serve"
        best = run["label"] == data["best_grpo"]
        sweep = sum(r["method"] == "grpo" for r in data["runs"]) > 1
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            marker="o" if es else "s",
            capsize=3,
            lw=2.2 if es or best else 1.0,
            alpha=1.0 if es or best else 0.6,
            label=run["label"] + (" (best GRPO)" if best and sweep else ""),
        )
    meta = data["meta"]
    ax.set_xlabel("training wall-clock minutes (evaluation excluded)")
    ax.set_ylabel(f"held-out reward ({meta['eval_prompts']} prompts, ±1 s.e.)")
    ax.set_title(f"{meta['model']} on {meta['task']}, {_threads(meta['threads'])} per run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    checked = check(args)
    config = checked["config"]
    from benchmarks.throughput import machine
    from es_serve.engines.sizing import resolve_dtype

    cpus = pick_cpus(args.threads)
    threads = len(cpus)
    grpo_dtype = resolve_dtype(args.grpo_dtype)
    out = Path(args.out or f"benchmarks/results/compare_{config.task.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    # vLLM's CPU backend binds its own OpenMP threads; give it the same CPUs the GRPO runs are pinned to.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cpus))
    env.setdefault("HF_HUB_OFFLINE", "1")
    seconds, every = args.minutes * 60, args.eval_every_minutes * 60
    base = {
        "config_file": args.config,
        "overrides": list(args.overrides),
        "seconds": seconds,
        "eval_every_seconds": every,
        "threads": threads,
        "cpus": cpus,
        "grpo_dtype": grpo_dtype,
        "grpo_dtype_rule": f"--grpo-dtype {args.grpo_dtype}: bfloat16 autocast where the CPU has native bf16 "
        "instructions (as model.dtype=auto), else float32",
        "grpo_set": checked["grpo_set"],
        # es-serve's training prompts, in order, for more GRPO steps than the budget can hold.
        "pool_prompts": max(512, int(seconds * 8)),
    }
    specs = [] if args.skip_es else [{**base, "method": "es-serve", "name": "es-serve"}]
    specs += [{**base, "method": "grpo", "name": f"grpo-lr{lr:g}", "lr": lr} for lr in args.grpo_lrs]
    runs = []
    with tempfile.TemporaryDirectory(prefix="es-serve-compare-") as tmp:
        # A fresh directory each time: es-serve refuses to train into a run directory that holds a run.
        work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S") if args.work else Path(tmp)
        for spec in specs:
            spec["work"] = str(work / spec["name"])
            Path(spec["work"]).mkdir(parents=True, exist_ok=True)
            print(
                f"es-serve compare: {spec['name']}, {args.minutes:g} min of training ...", file=sys.stderr, flush=True
            )
            try:
                run = run_one(spec, work, args.verbose, env)
            except RuntimeError as exc:
                print(f"es-serve compare: {exc}", file=sys.stderr)
                return 1
            first, last = run["evals"][0]["mean"], run["evals"][-1]["mean"]
            print(
                f"es-serve compare: {run['label']}: {run['steps']} steps, {run['completions']} completions, "
                f"held-out {_num(first)} -> {_num(last)}",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run)
    host = machine()
    meta = {
        "command": " ".join(["es-serve compare", *argv]),
        "model": config.model.name,
        "task": config.task.name,
        "reward": config.reward.fn or checked["task"].default_reward,
        "eval_prompts": config.task.eval_prompts,
        "max_tokens": config.generation.max_tokens,
        "minutes": args.minutes,
        "eval_every_minutes": args.eval_every_minutes,
        "threads": threads,
        "cpus": cpus,
        "machine": f"{host['cpu_model']}, {host['arch']}, {host['cores']} cores",
        "grpo_dtype": grpo_dtype,
        "grpo_dtype_rule": f"--grpo-dtype {args.grpo_dtype}: bfloat16 autocast where the CPU has native bf16 "
        "instructions (as model.dtype=auto), else float32",
        "grpo_generation": GENERATION_NOTE,
        "evaluator": EVALUATOR_NOTE,
        "stop_rule": "a run stops at the first step boundary at or past the budget; evaluation pauses the clock",
        **host,
    }
    data = report(runs, meta)
    out.write_text(json.dumps(data, indent=1))
    md = table(data)
    out.with_suffix(".md").write_text(md)
    plot(data, out.with_suffix(".png"))
    print("\n" + md)
    print(f"es-serve compare: wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
