"""One method of `es-serve compare` under a wall-clock budget, in a process of its own.

    python -m benchmarks.compare_runs '<spec as JSON>'

The spec (written by benchmarks/compare.py) names the method ("es-serve" or "grpo"), the es-serve
configuration both methods share (model, task, reward, held-out rows, max new tokens), the budget, the
evaluation period, the CPUs and threads, and the JSON file to write. Training time is a stopwatch
that evaluation pauses; a run stops at the first step boundary at or past the budget.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.child import end_with_parent

# Evaluation and checkpoint periods are the budget's business here, not the configuration's. train.steps
# stays: es-serve's lr schedule is laid out over it, so its run ends at the budget or when the schedule
# does, whichever comes first.
NEVER = 10**9
FORCED = [f"train.eval_every={NEVER}", f"train.checkpoint_every={NEVER}"]


def _pin(spec: dict) -> None:
    # Both methods get the same CPUs and thread count, set before torch starts its thread pool.
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(spec["cpus"]))
    import torch

    torch.set_num_threads(spec["threads"])


def _shared(spec: dict):
    from es_serve.config import load_config
    from es_serve.models import resolve_model
    from rewards import load_reward, task_from_config

    config = load_config(spec.get("config_file"), [*spec["overrides"], *FORCED])
    task = task_from_config(config.task)
    reward = load_reward(config.reward.fn or task.default_reward, weights=config.reward.weights)
    return config, task, reward, resolve_model(config.model.name)


class Budget:
    """The training stopwatch, the budget and the next evaluation mark (all in seconds of training)."""

    def __init__(self, seconds: float, eval_every: float):
        from benchmarks.compare_eval import Stopwatch

        self.clock, self.seconds, self.every = Stopwatch(), seconds, eval_every
        self.next_eval = eval_every

    def over(self) -> bool:
        return self.clock.seconds() >= self.seconds

    def eval_due(self) -> bool:
        now = self.clock.seconds()
        if now < self.next_eval:
            return False
        while self.next_eval <= now:
            self.next_eval += self.every
        return True


def _point(budget: Budget, step: int, completions: int, result: dict) -> dict:
    return {"minutes": budget.clock.seconds() / 60, "step": step, "completions": completions, **result}


def _summary(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    return {
        "median": statistics.median(seconds),
        "mean": statistics.fmean(seconds),
        "min": min(seconds),
        "max": max(seconds),
    }


def run_es(spec: dict) -> dict:
    from benchmarks.compare_eval import HeldOut, changed_from_checkpoint, peak_rss_bytes
    from es_serve.engines import build_engine
    from es_serve.engines.sizing import resolve_dtype
    from es_serve.trainer import Trainer

    config, task, reward, model_dir = _shared(spec)
    started = time.perf_counter()
    engine = build_engine(config, model_dir)
    trainer = Trainer(config, Path(spec["work"]) / "es-serve", engine, task, reward)
    trainer.start(resume=False)
    heldout = HeldOut(trainer, model_dir, config.generation.max_tokens)
    counted = {"completions": 0}
    generate_population = engine.generate_population

    def counting(gen, prompts, sampling):
        result = generate_population(gen, prompts, sampling)
        counted["completions"] += sum(len(row) for row in result.completions)
        return result

    engine.generate_population = counting  # counts what the engine really returned
    budget = Budget(spec["seconds"], spec["eval_every_seconds"])

    def evaluate() -> dict:
        point = _point(
            budget, trainer.step, counted["completions"], heldout.evaluate(engine.state_dict(), trainer.step)
        )
        # es-serve's own evaluation (its engine, in the model's dtype), for reference to `es-serve train`.
        native = trainer.evaluate()
        point["native"] = {"mean": native["eval_reward"], "stderr": native["eval_stderr"]}
        return point

    setup_seconds = time.perf_counter() - started
    evals, steps = [evaluate()], []
    budget.clock.start()
    while not budget.over() and trainer.step < trainer.config.train.steps:
        record = trainer.train_step().record
        steps.append({k: record.get(k) for k in ("step", "reward_mean", "gen_tokens", "gen_seconds", "step_seconds")})
        steps[-1]["train_minutes"] = budget.clock.seconds() / 60
        if budget.eval_due() and not budget.over():
            with budget.clock.paused():
                evals.append(evaluate())
    budget.clock.stop()
    if evals[-1]["step"] != trainer.step:
        evals.append(evaluate())
    peak = peak_rss_bytes()
    threads = engine.kernel_report()["threads"] if hasattr(engine, "kernel_report") else None
    gen_tokens = sum(s["gen_tokens"] or 0 for s in steps)
    gen_seconds = sum(s["gen_seconds"] or 0 for s in steps)
    es = config.es
    return {
        "method": "es-serve",
        "label": "es-serve",
        "lr": es.lr,
        "dtype": f"{resolve_dtype(config.model.dtype)}, float32 master weights",
        "engine": config.engine.kind,
        "threads": threads,
        "settings": {
            "population": es.population,
            "prompts_per_step": config.task.prompts_per_step,
            "completions_per_step": es.population * config.task.prompts_per_step,
            "es": es.model_dump(),
            "engine": config.engine.model_dump(),
        },
        "steps": trainer.step,
        "stopped_by": "budget" if budget.over() else "train.steps",
        "completions": counted["completions"],
        "gen_tokens": gen_tokens,
        "gen_seconds": gen_seconds,
        "step_records": steps,
        "step_seconds": _summary([s["step_seconds"] for s in steps]),
        "setup_seconds": setup_seconds,
        "peak_rss_bytes": peak,
        "evals": evals,
        "weights": changed_from_checkpoint(model_dir, engine.state_dict()),
        "eval_prompts": heldout.texts,
        **_clock(budget, evals),
    }


def _clock(budget: Budget, evals: list[dict]) -> dict:
    return {
        "budget_seconds": budget.seconds,
        "train_seconds": budget.clock.seconds(),
        "eval_seconds": sum(e["seconds"] for e in evals),
    }


# What TRL's defaults leave open and a wall-clock budget on a CPU decides.
GRPO_FIXED = {
    # The number of steps a budget allows is unknown in advance, so the default linear decay to zero
    # at max_steps would never get anywhere.
    "lr_scheduler_type": "constant",
    # Memory is not what limits a small model on a CPU; recomputing activations would cost ~20 % of every step.
    "gradient_checkpointing": False,
    "use_cpu": True,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "max_steps": NEVER,
    # es-serve's stream of training prompts, in its order, so both methods see the same prompts.
    "shuffle_dataset": False,
    "disable_tqdm": True,
}
GRPO_RECORDED = (
    "learning_rate",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "generation_batch_size",
    "steps_per_generation",
    "beta",
    "loss_type",
    "scale_rewards",
    "temperature",
    "top_p",
    "top_k",
    "epsilon",
    "epsilon_high",
    "num_iterations",
    "max_completion_length",
    "lr_scheduler_type",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "warmup_steps",
    "gradient_checkpointing",
    "bf16",
    "use_vllm",
    "use_transformers_continuous_batching",
    "mask_truncated_completions",
    "seed",
)


def run_grpo(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.compare_eval import HeldOut, changed_from_checkpoint, peak_rss_bytes
    from es_serve.trainer import Trainer
    from es_serve.types import Completion

    config, task, reward, model_dir = _shared(spec)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # es-serve's Trainer without an engine: its prompt rendering and reward call, nothing else.
    scorer = Trainer(config, Path(spec["work"]) / "grpo-scorer", None, task, reward, tokenizer=tokenizer)
    heldout = HeldOut(scorer, model_dir, config.generation.max_tokens)

    pool, step = [], 1
    while len(pool) < spec["pool_prompts"]:
        pool += task.sample(config.task.prompts_per_step, step)
        step += 1
    texts = [scorer.render(r) for r in pool]
    # Chat prompts go to TRL as messages, which it renders with the same template (and rewards then get
    # TRL's conversational form, as in es-serve); without a chat template, the text es-serve generates from.
    chat = bool(getattr(tokenizer, "chat_template", None)) and scorer.messages(pool[0]) is not None
    prompts = [scorer.messages(r) for r in pool] if chat else texts
    dataset = Dataset.from_dict({"prompt": prompts, "row_index": list(range(len(pool)))})
    prompt_tokens_match = _same_prompt_tokens(tokenizer, prompts[:64], texts[:64], chat)

    stats = {"completions": 0, "tokens": 0, "gen_seconds": 0.0}

    def es_serve_reward(prompts, completions, completion_ids, row_index, trainer_state=None, **_):
        rows = [pool[i] for i in row_index]
        done = [
            Completion(c if isinstance(c, str) else c[0]["content"], list(ids))
            for c, ids in zip(completions, completion_ids, strict=True)
        ]
        stats["completions"] += len(done)
        stats["tokens"] += sum(len(c.token_ids) for c in done)
        at = (trainer_state.global_step if trainer_state is not None else 0) + 1
        scored, _ = scorer.score(rows, [texts[i] for i in row_index], [done], at)
        return [None if math.isnan(x) else float(x) for x in scored.matrix[0].tolist()]

    es_serve_reward.__name__ = f"es_serve_{reward.name}"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    options = {**GRPO_FIXED, "bf16": spec["grpo_dtype"] == "bfloat16", "seed": config.es.seed, **spec["grpo_set"]}
    args = GRPOConfig(
        output_dir=str(Path(spec["work"]) / "grpo"),
        learning_rate=spec["lr"],
        max_completion_length=config.generation.max_tokens,
        **options,
    )
    budget = Budget(spec["seconds"], spec["eval_every_seconds"])
    evals, steps = [], []

    def evaluate(at: int) -> dict:
        return _point(budget, at, stats["completions"], heldout.evaluate(model.state_dict(), at))

    class Budgeted(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            budget.clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            now = budget.clock.seconds()
            previous = steps[-1]["train_minutes"] * 60 if steps else 0.0
            steps.append({"step": state.global_step, "step_seconds": now - previous, "train_minutes": now / 60})
            if budget.over():
                control.should_training_stop = True
            elif budget.eval_due():
                with budget.clock.paused():
                    evals.append(evaluate(state.global_step))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[es_serve_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Budgeted()],
    )
    trainer.remove_callback(PrinterCallback)  # a dict per step on stdout; the JSON keeps the log instead
    generate = model.generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            stats["gen_seconds"] += time.perf_counter() - t

    model.generate = timed_generate  # TRL generates through the model it was given (no vLLM here)
    setup_seconds = time.perf_counter() - started
    evals.append(evaluate(0))
    trainer.train()
    budget.clock.stop()
    if evals[-1]["step"] != trainer.state.global_step:
        evals.append(evaluate(trainer.state.global_step))
    peak = peak_rss_bytes()
    log = [
        {k: v for k, v in entry.items() if isinstance(v, int | float)}
        for entry in trainer.state.log_history
        if "loss" in entry or "reward" in entry
    ]
    return {
        "method": "grpo",
        "label": f"GRPO lr={spec['lr']:g}",
        "lr": spec["lr"],
        "dtype": "bfloat16 autocast, float32 weights" if args.bf16 else "float32",
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "engine": "transformers generate()",
        "threads": torch.get_num_threads(),
        "settings": {
            **{k: _plain(getattr(args, k, None)) for k in GRPO_RECORDED},
            "completions_per_step": args.generation_batch_size // args.steps_per_generation,
            "prompts_per_step": args.generation_batch_size // args.steps_per_generation // args.num_generations,
            "trl_version": trl.__version__,
            "prompts_as": "chat messages (TRL applies the chat template)" if chat else "rendered text",
            "prompt_tokens_match_es_serve": prompt_tokens_match,
            "set": spec["grpo_set"],
        },
        "steps": trainer.state.global_step,
        "completions": stats["completions"],
        "gen_tokens": stats["tokens"],
        "gen_seconds": stats["gen_seconds"],
        "step_records": steps,
        "trl_log": log,
        "step_seconds": _summary([s["step_seconds"] for s in steps]),
        "setup_seconds": setup_seconds,
        "peak_rss_bytes": peak,
        "evals": evals,
        "weights": changed_from_checkpoint(model_dir, model.state_dict()),
        "eval_prompts": heldout.texts,
        **_clock(budget, evals),
    }


def _plain(value):
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _same_prompt_tokens(tokenizer, prompts: list, texts: list[str], chat: bool) -> bool:
    """Whether TRL's tokenization of the prompts (as GRPOTrainer does it) gives es-serve's token ids."""
    ours = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if chat:
        theirs = tokenizer.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        theirs = tokenizer(text=prompts)["input_ids"]
    return [list(x) for x in theirs] == ours


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    end_with_parent()
    spec = json.loads(argv[0])
    _pin(spec)
    result = (run_es if spec["method"] == "es-serve" else run_grpo)(spec)
    result["cpus"] = spec.get("cpus")
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
