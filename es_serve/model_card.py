"""The model card (README.md) of an exported run: what was trained, how, and what it gained."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .run_dir import RunDir


def base_model_id(name: str) -> str | None:
    """The Hub id of the base model, for the card's `base_model` field; None for a local directory."""
    from .models import HUB_IDS, looks_like_hub_id

    if name in HUB_IDS:
        return HUB_IDS[name]
    return name if looks_like_hub_id(name) else None


def _reward(config: Config) -> str:
    if config.reward.fn:
        fns = config.reward.fn
        return f"{fns} (weights {config.reward.weights})" if config.reward.weights else fns
    try:
        from rewards import get_task

        return f"{get_task(config.task.name).default_reward} (the task's default)"
    except Exception:  # a task this version cannot build: say so rather than fail the export
        return "the task's default reward"


def _task(config: Config) -> str:
    dataset = getattr(config.task, "dataset", None)
    if dataset:
        split = getattr(config.task, "split", None)
        return f"dataset `{dataset}`" + (f" (split `{split}`)" if split else "")
    return f"built-in task `{config.task.name}`"


def _gain_lines(run: RunDir, step: int) -> list[str]:
    from .trainer import eval_gain

    metrics = [m for m in run.metrics() if m.get("step", 0) <= step]
    gain = eval_gain(metrics)
    if gain is None:
        return ["No held-out gain: the run has fewer than two evaluations (see `train.eval_every`)."]
    return [
        f"Greedy reward on {gain['prompts']} held-out prompts: {gain['first']:.3f} at step {gain['first_step']}, "
        f"{gain['last']:.3f} at step {gain['last_step']}.",
        "",
        f"**Gain: {gain['gain']:+.3f} ± {gain['paired_stderr']:.3f}** (mean per-prompt change, paired standard "
        f"error over the same {gain['prompts']} prompts; read a gain below about two standard errors as noise).",
    ]


def model_card(config: Config, run: RunDir, step: int, title: str, trained: list[str] | None = None) -> str:
    """`trained`: the checkpoint's module names actually trained (Phi-3 fuses q/k/v and gate/up)."""
    es = config.es
    base = base_model_id(config.model.name)
    # A local directory is named by its last part only: its path means nothing on the Hub.
    shown = base or f"{Path(config.model.name).name} (a local directory)"
    modules = ", ".join(es.modules)
    if trained and list(trained) != list(es.modules):
        modules += f" (in this checkpoint: {', '.join(trained)})"
    front = {"library_name": "transformers", "tags": ["es-serve", "evolution-strategies", "eggroll"]}
    if base:
        front["base_model"] = base
    dataset = getattr(config.task, "dataset", None)
    if dataset and not Path(str(dataset)).exists() and "/" in str(dataset):
        front["datasets"] = [str(dataset)]
    header = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", ""]
    settings = [
        ("base model", f"`{shown}`" if base else shown),
        ("task", _task(config)),
        ("reward", f"`{_reward(config)}`"),
        ("steps", f"{step} (of {config.train.steps} configured)"),
        ("population N", f"{es.population} ({'antithetic pairs' if es.antithetic else 'independent draws'})"),
        ("rank r", str(es.rank)),
        ("sigma", repr(es.sigma)),
        ("learning rate", f"{es.lr!r} ({es.scaling} scaling)"),
        *_optimizer_rows(es),
        ("fitness shaping", es.shaping),
        ("noise reuse", f"{es.noise_reuse} step(s)"),
        ("trained modules", modules),
        ("prompts per step", str(config.task.prompts_per_step)),
        ("new tokens per completion", str(config.generation.max_tokens)),
        ("seed", str(es.seed)),
    ]
    body = [
        f"# {title}",
        "",
        f"{f'`{base}`' if base else shown} trained with evolution strategies (EGGROLL: every population member "
        f"is a rank-{es.rank} perturbation, generated as a LoRA adapter in vLLM) by "
        f"es-serve. Only the decoder's linear weights changed; embeddings, norms and biases are "
        "the base model's.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in settings),
        "",
        "## Held-out evaluation",
        "",
        *_gain_lines(run, step),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{title}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{title}")',
        "```",
        "",
        "vLLM serves the directory as it is: `vllm serve <directory or repository>`.",
        "",
    ]
    return "\n".join(header + body)


def _optimizer_rows(es) -> list[tuple[str, str]]:
    """Rows for settings away from their defaults (plain sgd, constant lr and sigma), so a default card reads as before."""
    rows = []
    if es.optimizer == "momentum":
        rows.append(("optimizer", f"momentum ({es.momentum!r})"))
    elif es.optimizer == "adam":
        rows.append(("optimizer", f"adam (beta1 {es.adam_beta1!r}, beta2 {es.adam_beta2!r}, eps {es.adam_eps!r})"))
    if es.lr_schedule != "constant" or es.warmup_steps:
        rows.append(("lr schedule", f"{es.lr_schedule} to {es.lr_min_ratio!r} x lr, {es.warmup_steps} warmup step(s)"))
    if es.sigma_schedule != "constant":
        rows.append(("sigma schedule", f"{es.sigma_schedule} to {es.sigma_min_ratio!r} x sigma"))
    return rows
