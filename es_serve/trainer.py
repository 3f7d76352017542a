"""The ES loop: sample prompts, generate for every member, score, shape, merge; evaluate now and then.

ask/tell in evosax's sense: the engine's generate_population is the ask (all members at once), the
shaped fitness handed to apply_update is the tell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters import Population, noise_epoch, shape_fitness
from adapters.noise import NOISE_VERSION

from .config import Config
from .run_dir import RunDir
from .types import Generation, Sampling
from .weights import replay_updates


@dataclass
class StepReport:
    step: int
    record: dict


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path, engine, task, reward, tokenizer=None):
        self.config, self.engine, self.task, self.reward = config, engine, task, reward
        self.run = RunDir(run_dir)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        es = config.es
        self.population = Population(es.population, es.rank, es.sigma, es.antithetic)
        gen_cfg = config.generation
        self.sampling = Sampling(gen_cfg.max_tokens, gen_cfg.temperature, gen_cfg.top_p, es.seed, gen_cfg.ignore_eos)
        self.eval_sampling = Sampling(gen_cfg.max_tokens, 0.0, 1.0, es.seed)
        self.step = 0
        self.stop_requested = False
        # A multi-replica engine restores replicas that join later from this run's checkpoints.
        if hasattr(engine, "attach_run"):
            engine.attach_run(self.run)

    # -- prompts ------------------------------------------------------------------------------
    def render(self, row: dict) -> str:
        messages = row.get("messages")
        if messages and self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return row["prompt"]

    @staticmethod
    def columns(rows: list[dict]) -> dict[str, list]:
        keys = [k for k in rows[0] if k not in ("prompt", "messages")] if rows else []
        return {k: [r.get(k) for r in rows] for k in keys}

    # -- resume -------------------------------------------------------------------------------
    def start(self, resume: bool) -> int:
        """Creates the run directory, or restores the engine to the last committed step."""
        if not resume:
            if self.run.exists() and self.run.replay():
                raise FileExistsError(
                    f"{self.run.path} already holds a run; pass --resume {self.run.path} to continue it "
                    "or choose another --out"
                )
            self.run.create(self.config)
            return 0
        step = self.run.repair()
        logged = {m.get("step") for m in self.run.metrics()}
        for entry in self.run.replay():
            if entry["step"] not in logged:
                # Killed between the commit and its metrics line: the replay log holds the rewards.
                self.run.log_metrics(_metrics_from_replay(entry))
        if step:
            ckpt_step, path = self.run.latest_checkpoint(at_most=step)
            weights = self.run.load_checkpoint(path) if path else self.engine.state_dict()
            if path is None:
                ckpt_step = 0
            replay_updates(weights, self.engine.targets, self.run.replay(), ckpt_step, step)
            self.engine.load_state_dict(weights)
        self.step = step
        return step

    # -- one step -----------------------------------------------------------------------------
    def generation(self, step: int) -> Generation:
        es = self.config.es
        return Generation(self.population, es.seed, noise_epoch(step - 1, es.noise_reuse), step)

    def train_step(self) -> StepReport:
        step = self.step + 1
        started = time.perf_counter()
        rows = self.task.sample(self.config.task.prompts_per_step, step)
        prompts = [self.render(r) for r in rows]
        gen = self.generation(step)
        result = self.engine.generate_population(gen, prompts, self.sampling)
        completions = [[c.text for c in row] for row in result.completions]
        # A failing reward raises here, before any weight changes; the step can simply be rerun.
        scored = self.reward.score(prompts, completions, self.columns(rows))
        shaped = shape_fitness(scored.matrix, self.config.es.shaping, self.population.size, valid=scored.valid)
        t_update = time.perf_counter()
        self.engine.apply_update(gen, shaped, self.config.es.lr, self.config.es.scaling)
        update_seconds = time.perf_counter() - t_update
        pop = self.population
        self.run.commit_step(
            {
                "step": step,
                "seed": gen.seed,
                "epoch": gen.epoch,
                "noise": NOISE_VERSION,  # the engines draw members and the update with this version
                "population": {"size": pop.size, "rank": pop.rank, "sigma": pop.sigma, "antithetic": pop.antithetic},
                "lr": self.config.es.lr,
                "scaling": self.config.es.scaling,
                "shaped": [float(x) for x in shaped],
                "rewards": [[_json_float(x) for x in row] for row in scored.matrix.tolist()],
            }
        )
        self.step = step
        valid = scored.matrix[scored.valid]
        record = {
            "step": step,
            "reward_mean": float(valid.mean()) if valid.numel() else None,
            "reward_std": float(valid.std(unbiased=False)) if valid.numel() else None,
            "reward_max": float(valid.max()) if valid.numel() else None,
            "scored_fraction": float(scored.valid.float().mean()),
            "gen_tokens": result.tokens,
            "gen_seconds": result.seconds,
            "gen_tok_s": result.tokens / result.seconds if result.seconds else None,
            "update_seconds": update_seconds,
        }
        for name, matrix in scored.per_reward.items():
            finite = matrix[~torch.isnan(matrix)]
            record[f"reward/{name}"] = float(finite.mean()) if finite.numel() else None
        if step % self.config.train.checkpoint_every == 0 or step == self.config.train.steps:
            self.run.save_checkpoint(step, self.engine.state_dict())
        if step % self.config.train.eval_every == 0 or step == self.config.train.steps:
            record.update(self.evaluate())
        record.update(getattr(self.engine, "traffic", None) or {})  # bytes between driver and replicas
        record["step_seconds"] = time.perf_counter() - started
        self.run.log_metrics(record)
        return StepReport(step, record)

    def evaluate(self) -> dict:
        rows = self.task.eval_rows(self.config.task.eval_prompts)
        prompts = [self.render(r) for r in rows]
        completions = self.engine.generate(prompts, self.eval_sampling)
        scored = self.reward.score(prompts, [[c.text for c in completions]], self.columns(rows))
        per_prompt = scored.matrix[0]
        ok = ~torch.isnan(per_prompt)
        values = per_prompt[ok]
        n = max(int(values.numel()), 1)
        return {
            "eval_reward": float(values.mean()) if values.numel() else None,
            # Standard error over held-out prompts: the noise band the curve is judged against.
            "eval_stderr": float(values.std(unbiased=True) / math.sqrt(n)) if values.numel() > 1 else None,
            "eval_per_prompt": [_json_float(x) for x in per_prompt.tolist()],
            "eval_sample": completions[0].text[:200] if completions else "",
        }

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume: bool = False, on_step: Callable[[StepReport], None] | None = None) -> list[dict]:
        step = self.start(resume)
        if step == 0 and not any(m.get("step") == 0 for m in self.run.metrics()):
            record = {"step": 0, **self.evaluate()}
            self.run.log_metrics(record)
            if on_step:
                on_step(StepReport(0, record))
        while self.step < self.config.train.steps and not self.stop_requested:
            report = self.train_step()
            if on_step:
                on_step(report)
        return self.run.metrics()


def eval_gain(metrics: list[dict]) -> dict | None:
    """Last eval against the first on the same held-out prompts, with the paired standard error.

    Pairing by prompt removes prompt difficulty from the noise, so the gain is judged against
    the spread of per-prompt changes rather than the spread of rewards.
    """
    evals = [m for m in metrics if m.get("eval_per_prompt")]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    pairs = [
        (b - a)
        for a, b in zip(first["eval_per_prompt"], last["eval_per_prompt"], strict=False)
        if a is not None and b is not None
    ]
    if len(pairs) < 2:
        return None
    d = torch.tensor(pairs, dtype=torch.float64)
    return {
        "first_step": first["step"],
        "last_step": last["step"],
        "first": first["eval_reward"],
        "last": last["eval_reward"],
        "gain": float(d.mean()),
        "paired_stderr": float(d.std(unbiased=True) / math.sqrt(len(pairs))),
        "prompts": len(pairs),
    }


def _metrics_from_replay(entry: dict) -> dict:
    values = torch.tensor([x for row in entry["rewards"] for x in row if x is not None], dtype=torch.float64)
    return {
        "step": entry["step"],
        "reward_mean": float(values.mean()) if values.numel() else None,
        "reward_std": float(values.std(unbiased=False)) if values.numel() else None,
        "recovered_from_replay": True,
    }


def _json_float(x: float):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
