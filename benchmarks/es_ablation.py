"""The main-job ablation behind es-serve's defaults, as a table from the runs' own metrics files.

Each run is `es-serve train` with the `--set` keys that differ from the base configuration; its
config.toml and metrics.jsonl sit in benchmarks/results/es_tuning/. Gains are the last held-out
evaluation against the first, paired by prompt (es_serve.trainer.eval_gain), so the table needs no
training of its own: `python -m benchmarks.es_ablation`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from es_serve.config import Config, load_config
from es_serve.trainer import eval_gain

RESULTS = Path(__file__).with_name("results") / "es_tuning"


def differences(config: Config, base: Config) -> list[str]:
    """The `--set` keys that turn the base configuration into this run's."""
    out = []
    for section in ("es", "task", "train"):
        mine, theirs = getattr(config, section).model_dump(), getattr(base, section).model_dump()
        out += [f"{section}.{k}={v}" for k, v in mine.items() if theirs.get(k) != v and "every" not in k]
    return out


def rows(folder: Path) -> list[dict]:
    base = load_config()
    out = []
    for path in sorted(folder.glob("*.metrics.jsonl")):
        name = path.name.removesuffix(".metrics.jsonl")
        config = load_config(path.with_name(f"{name}.config.toml"), saved_run=True)
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        evals = {m["step"]: m["eval_reward"] for m in metrics if m.get("eval_reward") is not None}
        gain = eval_gain(metrics)
        out.append(
            {
                "run": name,
                "set": differences(config, base),
                "evals": evals,
                "best": max(evals.values()),
                **({k: gain[k] for k in ("last_step", "gain", "paired_stderr")} if gain else {}),
            }
        )
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "| run | `--set` against today's defaults | held-out by step | last step | gain (± paired s.e.) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(table, key=lambda r: -r.get("gain", -1)):
        evals = ", ".join(f"{s}: {v:.3f}" for s, v in sorted(r["evals"].items()))
        gain = f"{r['gain']:+.3f} ± {r['paired_stderr']:.3f}" if "gain" in r else "-"
        keys = " ".join(f"`{s}`" for s in r["set"]) or "(defaults)"
        lines.append(f"| {r['run']} | {keys} | {evals} | {r.get('last_step', '-')} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.es_ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RESULTS, help="folder of NAME.metrics.jsonl + NAME.config.toml")
    args = parser.parse_args(argv)
    table = rows(args.runs)
    (args.runs / "ablation.json").write_text(json.dumps(table, indent=1) + "\n")
    (args.runs / "ablation.md").write_text(markdown(table))
    print(markdown(table), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
