"""What every engine takes and returns, so the ES loop never depends on which engine runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters import Population


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 is greedy; otherwise each request carries its own seed."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: every request generates exactly max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"generation.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"generation.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")

    def request_seed(self, member: int, prompt: int) -> int:
        # Keyed by (member, prompt) only, so a member's sample never depends on its batch neighbours.
        return (self.seed * 1_000_003 + member * 10_007 + prompt) % (2**31 - 1)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Generation:
    """One ES generation to evaluate: the population and the noise it draws."""

    population: Population
    seed: int
    epoch: int
    step: int = 0


@dataclass
class PopulationResult:
    """completions[i][p]: member i on prompt p."""

    completions: list[list[Completion]]
    seconds: float = 0.0
    tokens: int = field(default=0)


@dataclass
class TrainerState:
    """What reward functions get as `trainer_state`: the fields of transformers' TrainerState, which
    TRL passes, filled from the ES run (importing transformers' training stack would cost every run
    seconds at start for a handful of numbers)."""

    epoch: float = 0.0  # training epochs over a dataset task's rows (0 for generated tasks)
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 1
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None  # prompts per step (P)
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict | None = None
    stateful_callbacks: list | None = None
