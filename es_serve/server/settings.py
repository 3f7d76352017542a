"""What the operator decides when starting `es-serve serve`: address, key, directories and bounds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    runs: Path = Path("runs")
    rewards_dir: Path | None = None
    # Jobs may name dataset files (task.dataset) only inside this directory; none at all without it.
    data_dir: Path | None = None
    # Engine kind used when a completion names a model before any job has loaded an engine for it.
    engine: str = "vllm"
    # Bounds on what one request may ask for; they keep a single client from exhausting the machine.
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    max_n: int = 8
    max_prompts: int = 256
    max_prompt_chars: int = 32_000
    # How long the completion collector waits for more requests before one batched generate call.
    batch_window_s: float = 0.005
    max_batch: int = 512
    # Bounded queues: beyond these, requests get 429 with Retry-After instead of waiting without end.
    max_queued_jobs: int = 100
    max_pending_completions: int = 1024  # completion requests waiting or being answered
    job_retry_after_s: int = 60
    completion_retry_after_s: int = 1
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.runs = Path(self.runs)
        if self.rewards_dir is not None:
            self.rewards_dir = Path(self.rewards_dir)
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)

    @property
    def jobs_dir(self) -> Path:
        return self.runs / "jobs"
