"""The reward curve of a run, redrawn after every step."""

from __future__ import annotations

import io
from pathlib import Path

from .run_dir import atomic_write


def plot_metrics(metrics: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["reward_mean"]) for m in metrics if m.get("reward_mean") is not None]
    evals = [
        (m["step"], m["eval_reward"], m.get("eval_stderr") or 0.0) for m in metrics if m.get("eval_reward") is not None
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, values = zip(*train, strict=True)
        ax.plot(steps, values, label="population mean reward", color="#7a9cc6", lw=0.8, alpha=0.6)
        window = 5
        if len(values) >= window:
            smooth = [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]
            ax.plot(
                steps[window - 1 :], smooth, label=f"population mean, {window}-step average", color="#1f4e8c", lw=1.6
            )
    if evals:
        steps, values, errs = zip(*evals, strict=True)
        ax.errorbar(
            steps, values, yerr=errs, label="held-out eval (greedy, ±1 s.e.)", color="#c0392b", marker="o", capsize=3
        )
    ax.set_xlabel("ES step")
    ax.set_ylabel("reward")
    ax.set_title(title or "es-serve training")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
