"""Checking a submitted job before it is queued: every bad field is named in one 422 answer.

Everything that can be checked without loading a model is checked here (configuration keys and
types, task and its dataset, reward, model name, bounds), so a job that is accepted fails later only for reasons a
request cannot see, such as running out of memory.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from ..config import Config, _describe
from .settings import ServerSettings

JOB_KEYS = ("config",)


class FieldErrors(ValueError):
    """[(field, message)]: field is a dotted configuration key such as `es.population`."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(msg if msg.startswith(field) else f"{field}: {msg}" for field, msg in errors))

    def detail(self) -> list[dict]:
        return [{"field": field, "loc": ["body", *field.split(".")], "msg": msg} for field, msg in self.errors]


def parse_job(body, settings: ServerSettings) -> Config:
    """The Config of a job request `{"config": {...}}`; raises FieldErrors naming each bad field."""
    if not isinstance(body, dict):
        raise FieldErrors([("body", 'a job is a JSON object: {"config": {...the sections of the TOML...}}')])
    unknown = [k for k in body if k not in JOB_KEYS]
    if unknown:
        raise FieldErrors(
            [(k, f'unknown key {k!r}; a job is {{"config": {{...}}}} with the sections of the TOML') for k in unknown]
        )
    data = body.get("config", {})
    if not isinstance(data, dict):
        raise FieldErrors([("config", f"must be an object of configuration sections, got {type(data).__name__}")])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise FieldErrors([(_field(e["loc"]), _describe(e)) for e in exc.errors()]) from None
    errors = []
    task = None
    try:
        task = job_task(config, settings)
    except ValueError as exc:
        errors.append((getattr(exc, "field", "task.name"), str(exc)))
    if config.task.dataset and not config.reward.fn:
        errors.append(("reward.fn", "a dataset task has no default reward: set reward.fn"))
    elif task is not None:
        try:
            load_job_reward(config, task, settings)
        except ValueError as exc:
            field = "reward.weights" if "weights" in str(exc) and config.reward.weights is not None else "reward.fn"
            errors.append((field, str(exc)))
    model_error = _check_model(config.model.name)
    if model_error:
        errors.append(("model.name", model_error))
    if config.generation.max_tokens > settings.max_tokens:
        errors.append(
            (
                "generation.max_tokens",
                f"at most {settings.max_tokens} on this server, got {config.generation.max_tokens}",
            )
        )
    if config.engine.replicas > 1 or config.engine.ray_address:
        errors.append(("engine.replicas", "this server runs one engine: leave engine.replicas at 1 and no ray_address"))
    if errors:
        raise FieldErrors(errors)
    return config


def job_task(config: Config, settings: ServerSettings):
    """The job's task; dataset files only from the operator's data directory (--data-dir)."""
    from rewards import task_from_config

    return task_from_config(config.task, data_dir=settings.data_dir, restricted=True)


def load_job_reward(config: Config, task, settings: ServerSettings):
    """The job's reward, loaded only from built-ins, entry points or the operator's reward directory."""
    from rewards import load_reward

    return load_reward(
        config.reward.fn or task.default_reward,
        weights=config.reward.weights,
        restricted=True,
        reward_dir=settings.rewards_dir,
    )


def _field(loc) -> str:
    return ".".join(str(p) for p in loc) or "config"


def _check_model(name: str) -> str | None:
    from ..models import KNOWN_MODELS

    if name in KNOWN_MODELS:
        return None
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return None
    return (
        f"unknown model {name!r}: known names are {', '.join(KNOWN_MODELS)}, "
        "or give a Hugging Face model directory on the server"
    )
