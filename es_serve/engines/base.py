"""What the ES loop, the server and the benchmarks need from an engine.

Three engines implement it: `VLLMEngine` (members as LoRA adapters in vLLM's multi-LoRA batch, the
product), `DenseEngine` (W + E_i written into a plain transformers model, the reference the tests
compare against) and `RayEngine` (replicas of either, each evaluating a slice of the population).
A structural Protocol rather than a base class, so the engines share no code they do not need and the
dense reference stays independent of the vLLM path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from adapters import Optimizer, Target

from ..types import Completion, Generation, PopulationResult, Sampling


@runtime_checkable
class Engine(Protocol):
    targets: list[Target]
    """The trained matrices, in the order checkpoints and replay use."""

    def encode(self, prompt: str) -> list[int]: ...

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Completion]:
        """The unperturbed model (evaluation, serving)."""
        ...

    def generate_population(self, gen: Generation, prompts: Sequence[str], sampling: Sampling) -> PopulationResult:
        """Every member of `gen` on every prompt: rows are members, columns prompts."""
        ...

    def apply_update(
        self, gen: Generation, shaped_fitness, lr: float, scaling: str = "mean", optimizer: Optimizer | None = None
    ) -> None:
        """Merges one step into the float32 masters from seeds and shaped fitness alone."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The float32 masters of the trained matrices."""
        ...

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Momentum / Adam state as flat tensors; empty under sgd."""
        ...

    def load_state_dict(self, weights: dict[str, torch.Tensor], optimizer_state: dict | None = None): ...
