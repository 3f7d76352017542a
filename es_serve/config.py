"""Run configuration: pydantic models, read from TOML, overridden with `--set key=value`.

The key names are a public contract (`es-serve train --set es.population=64`); rename nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters import DEFAULT_MODULES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The defaults are the README's main job: SmolLM2-135M on arithmetic, 80 steps with a cosine-decayed
# lr (chosen from measured runs, see the README), about four minutes on a 2-core CPU with native bf16
# and about a quarter of an hour on an AVX2-only one in float32.


class ModelConfig(_Section):
    name: str = Field("smollm2-135m", description="a known model name (es-serve models) or a local HF directory")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="auto: bfloat16 where the hardware computes it natively, else float32"
    )
    max_model_len: int = Field(512, ge=64)


class ESConfig(_Section):
    population: int = Field(32, ge=2, description="members per generation (N)")
    rank: int = Field(1, ge=1, le=512)
    sigma: float = Field(1e-2, gt=0)
    lr: float = Field(1e-2, gt=0)
    optimizer: Literal["sgd", "momentum", "adam"] = Field(
        "sgd",
        description="rule applied to the ES gradient g = A diag(c) B^T / (N sqrt r): sgd (W += lr g), momentum "
        "(heavy ball, as torch.optim.SGD), adam (as torch.optim.Adam); momentum and adam keep float32 state "
        "next to the masters. Adam's step per weight is about lr whatever the size of g, while sgd's is "
        "lr x |g| with |g| about 1 / sqrt(N) (unit-variance shaped fitness, mean scaling): start adam near "
        "es.lr / sqrt(N) (1.8e-3 for the main job) and momentum near es.lr x (1 - es.momentum)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="es.optimizer=momentum: the velocity's decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="es.optimizer=adam: decay of the first moment")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="es.optimizer=adam: decay of the second moment")
    adam_eps: float = Field(
        1e-8,
        gt=0,
        description="es.optimizer=adam: added to sqrt(v); ES gradient entries are about 1 / sqrt(N), far "
        "above it, so it only guards entries that are exactly zero",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="es.lr over train.steps: after es.warmup_steps, decay to es.lr_min_ratio x es.lr"
    )
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="es.lr at the last step, as a fraction of es.lr")
    warmup_steps: int = Field(0, ge=0, description="steps over which es.lr rises linearly to its full value")
    sigma_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="es.sigma over train.steps, decaying to es.sigma_min_ratio x es.sigma (no warmup)"
    )
    sigma_min_ratio: float = Field(
        0.1, gt=0, le=1, description="es.sigma at the last step, as a fraction of es.sigma (> 0: members must differ)"
    )
    shaping: Literal["centered", "centered_raw", "zscore", "rank"] = "centered"
    scaling: Literal["mean", "sqrt"] = "mean"
    antithetic: bool = True
    noise_reuse: int = Field(1, ge=1, description="steps that share one noise epoch")
    seed: int = Field(0, ge=0)
    modules: list[str] = Field(default_factory=lambda: list(DEFAULT_MODULES))

    @model_validator(mode="after")
    def _even_population(self):
        if self.antithetic and self.population % 2:
            raise ValueError(
                f"es.population={self.population} is odd but es.antithetic is true: use an even population"
            )
        return self


class TaskConfig(_Section):
    name: str = Field("arithmetic", description="a built-in task; with task.dataset, a label (default 'dataset')")
    prompts_per_step: int = Field(4, ge=1)
    eval_prompts: int = Field(128, ge=1)
    seed: int = Field(0, ge=0)
    dataset: str | None = Field(
        None, description="JSONL/JSON/CSV/Parquet file, a Dataset.save_to_disk directory, or a Hub dataset id"
    )
    split: str = Field("train", description="the split of task.dataset to train on")
    prompt_column: str = Field("prompt", description="a plain string or a list of chat messages per row")
    system_prompt: str | None = Field(None, description="put first in every prompt without a system message")
    eval_dataset: str | None = Field(None, description="held-out data (default: task.eval_prompts rows held out)")
    eval_split: str | None = Field(None, description="split of task.eval_dataset (or of task.dataset)")

    @model_validator(mode="before")
    @classmethod
    def _dataset_label(cls, data):
        # A dataset task is not one of the built-in generators; its name only labels runs and jobs.
        if isinstance(data, dict) and data.get("dataset") and "name" not in data:
            data = {**data, "name": "dataset"}
        return data


class RewardConfig(_Section):
    fn: str | None = Field(None, description="built-in name, path/to/file.py:function or module:function")
    weights: list[float] | None = None
    timeout_s: float = Field(
        300.0, gt=0, description="seconds one step's (or one evaluation's) scoring may take before the step fails"
    )


class GenerationConfig(_Section):
    max_tokens: int = Field(12, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    ignore_eos: bool = Field(False, description="generate exactly max_tokens (throughput measurements)")


class TrainConfig(_Section):
    steps: int = Field(80, ge=0)
    eval_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    report_to: list[Literal["trackio", "tensorboard", "wandb"]] = Field(
        default_factory=list, description="where each step's metrics go besides metrics.jsonl"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value):
        # As in transformers' TrainingArguments: one name, a comma-separated string, "all" or "none".
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            if value == ["none"]:
                return []
            if value == ["all"]:
                return ["trackio", "tensorboard", "wandb"]
            return list(dict.fromkeys(value))
        return value


class EngineConfig(_Section):
    kind: Literal["vllm", "dense"] = "vllm"
    lora_kernel: Literal["es", "vllm"] = Field(
        "es", description="es: the member kernel for the LoRA term on CPU; vllm: vLLM's own LoRA ops"
    )
    memory_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="CPU: the most of the NUMA node's memory the KV cache may take (it is sized to the step); "
        "CUDA: the share of GPU memory vLLM may use",
    )
    ray_address: str | None = Field(
        None, description="'auto' (a cluster from `ray start`), 'local' (a private one here) or host:port"
    )
    replicas: int = Field(1, ge=1, description="engines, each a Ray actor evaluating a slice of the population")
    checksum_every: int = Field(5, ge=0, description="steps between weight checksum comparisons (0: never)")
    replica_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica")
    replica_gpus: float | None = Field(None, ge=0, description="Ray GPUs per replica; default 1 for vllm on GPUs")
    ray_timeout_s: float = Field(
        600.0, gt=0, description="seconds a replica may take for one call before it is treated as dead and replaced"
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    es: ESConfig = Field(default_factory=ESConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @field_validator("model", "es", "task", "reward", "generation", "train", "engine", mode="before")
    @classmethod
    def _section_is_table(cls, value, info):
        if value is not None and not isinstance(value, dict | BaseModel):
            raise ValueError(f"[{info.field_name}] must be a table of keys, got {value!r}")
        return value


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (no traceback needed)."""


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        parent = error["loc"][:-1]
        section = _section_of(parent)
        allowed = ", ".join(section.model_fields) if section else ", ".join(Config.model_fields)
        return f"unknown key '{key}'; allowed here: {allowed}"
    if error["type"] == "literal_error":
        return f"{key}: {msg} (got {error.get('input')!r})"
    if "input" in error and not isinstance(error["input"], dict) and error["loc"]:
        return f"{key}: {msg} (got {error['input']!r})"
    return msg if msg.startswith(f"{key}.") else f"{key}: {msg}"


def _section_of(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def validate(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in exc.errors())) from None


def parse_override(item: str) -> tuple[list[str], object]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (for example es.population=64), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: task.name=countdown
    return key.strip().split("."), value


def saved_before_schedules(data: dict) -> dict:
    """A run's or job's saved configuration: one written before lr schedules existed trained every step at
    es.lr, so it keeps that on resume and export rather than switching to today's default halfway through."""
    es = data.get("es")
    if isinstance(es, dict) and "lr_schedule" not in es:
        data = {**data, "es": {**es, "lr_schedule": "constant"}}
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), saved_run: bool = False) -> Config:
    """A TOML file plus `--set` overrides. saved_run: the file is a run directory's config.toml."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if saved_run:
        data = saved_before_schedules(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{k}' is a value, not a table")
            node = child
        node[keys[-1]] = value
    return validate(data)


def dump_config(config: Config) -> str:
    return tomli_w.dumps(config.model_dump(exclude_none=True))
