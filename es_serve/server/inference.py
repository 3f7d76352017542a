"""Which weights answer a completion, and the locked engine call that answers a batch of them.

A completion's `model` is a job id (that job's weights: live while it trains, its final weights
after) or a model name (the engine's current weights for that model: those of the running or
latest job on it, or the model's own weights if no job has run on it yet).
"""

from __future__ import annotations

from ..config import Config
from ..models import KNOWN_MODELS
from ..types import Completion, Sampling
from .engine_slot import Busy, EngineSlot
from .jobs import JobManager
from .settings import ServerSettings


class UnknownModel(LookupError):
    pass


class PromptTooLong(ValueError):
    pass


class Inference:
    def __init__(self, slot: EngineSlot, manager: JobManager, settings: ServerSettings):
        self.slot, self.manager, self.settings = slot, manager, settings

    def models(self) -> list[dict]:
        jobs = self.manager.jobs()
        names = dict.fromkeys([*KNOWN_MODELS, *(j["model"] for j in jobs)])
        out = [{"id": name, "object": "model", "created": 0, "owned_by": "es-serve"} for name in names]
        for job in jobs:
            out.append(
                {
                    "id": job["id"],
                    "object": "model",
                    "created": int(job["created"]),
                    "owned_by": "es-serve",
                    "root": job["model"],
                    "status": job["status"],
                    "step": job.get("step", 0),
                }
            )
        return out

    def resolve(self, model: str | None) -> str:
        """The target ('job-...' or a model name) a request's `model` field names."""
        if not model:
            holder, name = self.slot.holder, self.slot.model
            if holder or name:
                return holder or name
            jobs = [j for j in self.manager.jobs() if j.get("started")]
            if jobs:
                return jobs[-1]["id"]
            raise UnknownModel(self._unknown("no model is loaded yet, so `model` is required"))
        if self.manager.get(model) is not None:
            return model
        if model in KNOWN_MODELS or any(j["model"] == model for j in self.manager.jobs()):
            return model
        raise UnknownModel(self._unknown(f"unknown model {model!r}"))

    def _unknown(self, why: str) -> str:
        ids = [m["id"] for m in self.models()]
        return f"{why}; known: {', '.join(ids)} (GET /v1/models lists them)"

    def engine_for(self, target: str):
        """The engine holding `target`'s weights, loading them if the engine is free (Busy if it is not).

        The common case, weights already in place, skips the lock (see loaded_engine): the engine is
        checked again under the lock when the request runs.
        """
        engine = self.loaded_engine(target)
        if engine is not None:
            return engine
        with self.slot.lock:
            return self.prepare(target)

    def loaded_engine(self, target: str):
        """The engine if it already holds `target`'s weights, else None; never waits for the lock."""
        slot = self.slot
        engine = slot.engine
        if engine is not None and (
            slot.holder == target or (self.manager.get(target) is None and slot.model == target)
        ):
            return engine
        return None

    def prepare(self, target: str):
        """The engine holding `target`'s weights; the caller holds the slot's lock."""
        slot, running = self.slot, self.manager.current
        job = self.manager.get(target)
        if job is not None:
            if slot.engine is not None and slot.holder == target:
                return slot.engine
            if running is not None:
                raise Busy(
                    f"the engine is training {running}; {target}'s weights can be served after it finishes "
                    f"(model={running} answers from the weights being trained)"
                )
            if not job.get("started"):
                raise Busy(f"{target} has not started yet: it has no trained weights to answer with")
            from ..models import resolve_model

            config = Config.model_validate(job["config"])
            slot.load_job(target, config, resolve_model(config.model.name), job["run_dir"])
            return slot.engine
        if slot.engine is not None and slot.model == target:
            return slot.engine
        if running is not None:
            raise Busy(f"the engine is training {running} (model {slot.model}); {target} can be served after it")
        from ..models import resolve_model

        config = Config.model_validate({"model": {"name": target}, "engine": {"kind": self.settings.engine}})
        return slot.ensure(config, resolve_model(target))

    def run_group(self, target: str, sampling: Sampling, prompts: list) -> tuple[list, list[int]]:
        """Completions (or a PromptTooLong in a bad prompt's place) and prompt token counts."""
        with self.slot.lock:
            engine = self.prepare(target)
            limit = self.slot.config.model.max_model_len
            texts, counts, results = [], [], [None] * len(prompts)
            for i, prompt in enumerate(prompts):
                text = prompt if isinstance(prompt, str) else _render_chat(engine.tokenizer, prompt)
                n = len(engine.encode(text))
                counts.append(n)
                if n + sampling.max_tokens > limit:
                    results[i] = PromptTooLong(
                        f"prompt of {n} tokens plus max_tokens={sampling.max_tokens} exceeds the model's "
                        f"context of {limit} tokens; shorten the prompt or lower max_tokens"
                    )
                else:
                    texts.append((i, text))
            if texts:
                completions = engine.generate([t for _, t in texts], sampling)
                for (i, _), c in zip(texts, completions, strict=True):
                    results[i] = Completion(c.text, c.token_ids)
        return results, counts


def _render_chat(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a template: a plain transcript that ends where the answer goes.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
