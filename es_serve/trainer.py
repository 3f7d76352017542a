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

from adapters import Optimizer, Population, noise_epoch, shape_fitness
from adapters.noise import NOISE_VERSION
from adapters.schedule import scheduled
from rewards.aio import call_with_timeout
from rewards.reward_log import RewardLog

from .config import Config
from .run_dir import RunDir
from .types import Generation, Sampling, TrainerState
from .weights import restore_run


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
        self.optimizer = Optimizer(es.optimizer, es.momentum, es.adam_beta1, es.adam_beta2, es.adam_eps)
        gen_cfg = config.generation
        self.sampling = Sampling(gen_cfg.max_tokens, gen_cfg.temperature, gen_cfg.top_p, es.seed, gen_cfg.ignore_eos)
        self.eval_sampling = Sampling(gen_cfg.max_tokens, 0.0, 1.0, es.seed)
        self.step = 0
        self.stop_requested = False
        self.reporters = None  # train.report_to, open while train() runs
        # Row keys that carry the prompt; every other key is a column for the rewards.
        self._prompt_keys = tuple(getattr(task, "prompt_keys", ("prompt", "messages")))
        # A multi-replica engine restores replicas that join later from this run's checkpoints.
        if hasattr(engine, "attach_run"):
            engine.attach_run(self.run)

    # -- prompts ------------------------------------------------------------------------------
    def messages(self, row: dict) -> list[dict] | None:
        """The row's prompt as chat messages (task.system_prompt first), or None for a plain-text prompt."""
        prompt = row["prompt"]
        if isinstance(prompt, list):
            messages = [dict(m) for m in prompt]
        elif "messages" in self._prompt_keys and row.get("messages"):
            messages = [dict(m) for m in row["messages"]]  # built-in tasks: the prompt as a one-turn chat
        elif getattr(self.task, "plain_prompts_as_chat", False):
            # An instruct model answers a bare string badly; a one-turn chat is what the built-in tasks send too.
            messages = [{"role": "user", "content": prompt}]
        else:
            return None
        system = self.config.task.system_prompt
        if system and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def render(self, row: dict) -> str:
        """The text the engine generates from: the chat template applied to chat prompts."""
        messages = self.messages(row)
        if messages and self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(row["prompt"], list):
            raise ValueError(
                f"the prompts are chat messages but the tokenizer of {self.config.model.name} has no chat template; "
                "use a chat model or plain-string prompts"
            )
        if self.config.task.system_prompt and getattr(self.task, "plain_prompts_as_chat", False):
            raise ValueError(
                f"task.system_prompt needs a chat template, and the tokenizer of {self.config.model.name} has none"
            )
        return row["prompt"]

    def reward_prompts(self, rows: list[dict], rendered: list[str]) -> list:
        """Prompts as rewards get them (TRL's rule): message lists for chat data, else the text the model saw."""
        if rows and isinstance(rows[0]["prompt"], list):
            return [self.messages(r) for r in rows]
        return rendered

    def columns(self, rows: list[dict]) -> dict[str, list]:
        keys = [k for k in rows[0] if k not in self._prompt_keys] if rows else []
        return {k: [r.get(k) for r in rows] for k in keys}

    def score(self, rows: list[dict], prompts: list[str], completions, step: int) -> tuple:
        """(RewardResult, metrics the rewards logged) for N x P Completion objects."""
        log = RewardLog()
        scored = call_with_timeout(
            lambda: self.reward.score(
                self.reward_prompts(rows, prompts),
                [[c.text for c in row] for row in completions],
                self.columns(rows),
                completion_ids=[[list(c.token_ids) for c in row] for row in completions],
                prompt_texts=prompts,
                trainer_state=self.trainer_state(step),
                log=log,
            ),
            self.config.reward.timeout_s,
            what=getattr(self.reward, "name", type(self.reward).__name__),
        )
        return scored, log.summary()

    def trainer_state(self, step: int) -> TrainerState:
        """What TRL passes as `trainer_state`, at this step."""
        train = self.config.train
        epoch = self.task.epoch(step, self.config.task.prompts_per_step) if hasattr(self.task, "epoch") else 0.0
        return TrainerState(
            epoch=epoch,
            global_step=step,
            max_steps=train.steps,
            eval_steps=train.eval_every,
            save_steps=train.checkpoint_every,
            train_batch_size=self.config.task.prompts_per_step,
        )

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
                self.log_metrics(_metrics_from_replay(entry))
        if step:
            weights = self.engine.state_dict()
            _, state = restore_run(self.run, self.engine.targets, weights, upto=step)
            self.engine.load_state_dict(weights, state.tensors() if state is not None else None)
        self.step = step
        return step

    def save_checkpoint(self, step: int) -> None:
        """The trained matrices and the optimizer state of the same step, in one file."""
        self.run.save_checkpoint(step, self.engine.state_dict(), optimizer_state=self.engine.optimizer_state())

    # -- one step -----------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        """es.lr under es.lr_schedule at `step` (1-based) of train.steps."""
        es = self.config.es
        return scheduled(es.lr, es.lr_schedule, step, self.config.train.steps, es.lr_min_ratio, es.warmup_steps)

    def sigma(self, step: int) -> float:
        """es.sigma under es.sigma_schedule; the members' factors depend only on the seed, so any sigma
        rebuilds them (sigma scales them, and it is in every adapter address and replay line)."""
        es = self.config.es
        return scheduled(es.sigma, es.sigma_schedule, step, self.config.train.steps, es.sigma_min_ratio)

    def generation(self, step: int) -> Generation:
        es = self.config.es
        pop = self.population
        sigma = self.sigma(step)
        if sigma != pop.sigma:
            pop = Population(pop.size, pop.rank, sigma, pop.antithetic)
        return Generation(pop, es.seed, noise_epoch(step - 1, es.noise_reuse), step)

    def train_step(self) -> StepReport:
        step = self.step + 1
        started = time.perf_counter()
        rows = self.task.sample(self.config.task.prompts_per_step, step)
        prompts = [self.render(r) for r in rows]
        gen = self.generation(step)
        result = self.engine.generate_population(gen, prompts, self.sampling)
        # A failing reward raises here, before any weight changes; the step can simply be rerun.
        scored, (logged, extra) = self.score(rows, prompts, result.completions, step)
        shaped = shape_fitness(scored.matrix, self.config.es.shaping, self.population.size, valid=scored.valid)
        t_update = time.perf_counter()
        lr = self.lr(step)
        self.engine.apply_update(gen, shaped, lr, self.config.es.scaling, optimizer=self.optimizer)
        update_seconds = time.perf_counter() - t_update
        pop = gen.population
        self.run.commit_step(
            {
                "step": step,
                "seed": gen.seed,
                "epoch": gen.epoch,
                "noise": NOISE_VERSION,  # the engines draw members and the update with this version
                "population": {"size": pop.size, "rank": pop.rank, "sigma": pop.sigma, "antithetic": pop.antithetic},
                "lr": lr,
                "scaling": self.config.es.scaling,
                "optimizer": self.optimizer.record(),
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
            "lr": lr,
            "sigma": pop.sigma,
        }
        record.update(_lengths(result.completions, self.sampling.max_tokens))
        for name, matrix in scored.per_reward.items():
            finite = matrix[~torch.isnan(matrix)]
            record[f"reward/{name}"] = float(finite.mean()) if finite.numel() else None
        _add_logged(record, logged, extra, prefix="")
        if step % self.config.train.checkpoint_every == 0 or step == self.config.train.steps:
            self.save_checkpoint(step)
        if step % self.config.train.eval_every == 0 or step == self.config.train.steps:
            record.update(self.evaluate())
        record.update(getattr(self.engine, "traffic", None) or {})  # bytes between driver and replicas
        record["step_seconds"] = time.perf_counter() - started
        self.log_metrics(record)
        return StepReport(step, record)

    def log_metrics(self, record: dict) -> None:
        """The metrics line to metrics.jsonl, then to the train.report_to tools."""
        self.run.log_metrics(record)
        if self.reporters is not None:
            self.reporters.log(record)

    def evaluate(self) -> dict:
        rows = self.task.eval_rows(self.config.task.eval_prompts)
        prompts = [self.render(r) for r in rows]
        completions = self.engine.generate(prompts, self.eval_sampling)
        scored, (logged, extra) = self.score(rows, prompts, [completions], self.step)
        per_prompt = scored.matrix[0]
        ok = ~torch.isnan(per_prompt)
        values = per_prompt[ok]
        n = max(int(values.numel()), 1)
        record = {
            "eval_reward": float(values.mean()) if values.numel() else None,
            # Standard error over held-out prompts: the noise band the curve is judged against.
            "eval_stderr": float(values.std(unbiased=True) / math.sqrt(n)) if values.numel() > 1 else None,
            "eval_per_prompt": [_json_float(x) for x in per_prompt.tolist()],
            "eval_sample": completions[0].text[:200] if completions else "",
        }
        # TRL's convention for evaluation: the same names with eval_ in front.
        _add_logged(record, logged, extra, prefix="eval_")
        return record

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume: bool = False, on_step: Callable[[StepReport], None] | None = None) -> list[dict]:
        if self.config.train.report_to and self.reporters is None:
            from .reporting import Reporters

            self.run.path.mkdir(parents=True, exist_ok=True)
            self.reporters = Reporters(
                self.config.train.report_to, self.run.path, self.config.model_dump(mode="json", exclude_none=True)
            )
        try:
            step = self.start(resume)
            if step == 0 and not any(m.get("step") == 0 for m in self.run.metrics()):
                record = {"step": 0, **self.evaluate()}
                self.log_metrics(record)
                if on_step:
                    on_step(StepReport(0, record))
            while self.step < self.config.train.steps and not self.stop_requested:
                report = self.train_step()
                if on_step:
                    on_step(report)
        finally:
            if self.reporters is not None:
                self.reporters.close()
                self.reporters = None
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


def _lengths(completions, max_tokens: int) -> dict:
    """Completion lengths in tokens, under TRL's names; "clipped" ones stopped at max_tokens."""
    lengths = torch.tensor([len(c.token_ids) for row in completions for c in row], dtype=torch.float64)
    if not lengths.numel():
        return {}
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float((lengths >= max_tokens).double().mean()),
    }


def _metrics_from_replay(entry: dict) -> dict:
    values = torch.tensor([x for row in entry["rewards"] for x in row if x is not None], dtype=torch.float64)
    return {
        "step": entry["step"],
        "reward_mean": float(values.mean()) if values.numel() else None,
        "reward_std": float(values.std(unbiased=False)) if values.numel() else None,
        "recovered_from_replay": True,
    }


def _add_logged(record: dict, metrics: dict, extra: dict, prefix: str) -> None:
    """What rewards logged (log_metric means, log_extra columns) into a metrics line.

    A metric named like one of the trainer's own keys goes under `reward_log/<name>` instead, so
    neither hides the other.
    """
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        record[f"reward_log/{key}" if key in record or key in _TRAINER_KEYS else key] = value
    if extra:
        record[f"{prefix}log_extra"] = extra


# Keys a step or eval line may carry from the trainer itself.
_TRAINER_KEYS = frozenset(
    {
        "step",
        "reward_mean",
        "reward_std",
        "reward_max",
        "scored_fraction",
        "gen_tokens",
        "gen_seconds",
        "gen_tok_s",
        "update_seconds",
        "lr",
        "sigma",
        "step_seconds",
        "eval_reward",
        "eval_stderr",
        "eval_per_prompt",
        "eval_sample",
        "log_extra",
        "eval_log_extra",
        "recovered_from_replay",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
    }
)


def _json_float(x: float):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
