"""Bytes between the driver and its replicas per ES step, for two model sizes: the README's Ray table.

Two dense replicas on a private local Ray cluster (loopback only) train the built-in arithmetic task
for a few steps; the driver's `traffic` counters (the exact call arguments and results, serialised
as Ray sends them, without Ray's own constant framing) are read from each step's metrics. The update
a replica receives is seeds plus N shaped fitness values, so it must not grow with the model.

    python -m benchmarks.ray_bytes --populations 8 32 --json benchmarks/results/ray_bytes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

KEYS = (
    "net/update_sent_bytes",
    "net/update_received_bytes",
    "net/generate_sent_bytes",
    "net/generate_received_bytes",
)
MODELS = {
    # name: build_tiny_llama arguments; "13x" has about 13 times the trained parameters of "tiny".
    "tiny": {},
    "13x": {"layers": 4, "hidden": 256, "intermediate": 1024},
}


def _config(population: int, prompts: int, tokens: int, steps: int):
    from es_serve.config import load_config

    sets = {
        "model.dtype": "float32",
        "es.population": population,
        "task.prompts_per_step": prompts,
        "task.eval_prompts": 4,
        "generation.max_tokens": tokens,
        "train.steps": steps,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "engine.kind": "dense",
        "engine.replicas": 2,
        "engine.ray_address": "local",
        "engine.checksum_every": 0,
        "engine.replica_cpus": 1,
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def measure(model_dir: Path, population: int, prompts: int, tokens: int, steps: int, run_dir: Path) -> dict:
    from es_serve.engines.ray_engine import RayEngine
    from es_serve.trainer import Trainer
    from rewards import get_task, load_reward

    config = _config(population, prompts, tokens, steps)
    task = get_task("arithmetic", eval_size=4)
    engine = RayEngine(config, model_dir)
    try:
        trained = sum(t.out_features * t.in_features for t in engine.targets)
        metrics = Trainer(config, run_dir, engine, task, load_reward(task.default_reward)).train()
    finally:
        engine.close()
    per_step = [m for m in metrics if m.get("step", 0) > 0]
    row = {"trained_parameters": trained, "population": population, "prompts": prompts, "max_tokens": tokens}
    for key in KEYS:
        values = [m[key] for m in per_step]
        row[key.removeprefix("net/")] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    # The update goes to every replica alike; the table shows what one replica receives.
    row["update_sent_bytes_per_replica"] = row["update_sent_bytes"]["median"] / 2
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/ray_bytes.json")
    args = parser.parse_args(argv)
    if any(n < 2 or n % 2 for n in args.populations):
        parser.error(f"--populations must be even numbers >= 2, got {args.populations}")

    import ray

    from benchmarks.throughput import machine
    from es_serve.tiny_model import build_tiny_llama

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = {name: build_tiny_llama(tmp / name, **kwargs) for name, kwargs in MODELS.items()}
        for name, model_dir in dirs.items():
            for n in args.populations:
                row = measure(model_dir, n, args.prompts, args.max_tokens, args.steps, tmp / f"run-{name}-{n}")
                rows.append({"model": name, **row})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python -m benchmarks.ray_bytes " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine(), "python": platform.python_version()},
        "ray": ray.__version__,
        "replicas": 2,
        "engine": "dense",
        "rows": rows,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| model | trained parameters | N | update, sent to each replica | update, reply (both) | "
        "generation, sent | generation, received |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trained_parameters'] / 1e6:.2f} M | {r['population']} | "
            f"{r['update_sent_bytes_per_replica']:.0f} B | {r['update_received_bytes']['median']:.0f} B | "
            f"{r['generate_sent_bytes']['median'] / 1e3:.1f} KB | {r['generate_received_bytes']['median'] / 1e3:.1f} KB |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
