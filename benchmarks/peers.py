"""The two other ways of running ES through vLLM that the throughput benchmark compares against.

- `PeftFileStep`: the official EGGROLL-on-vLLM recipe. Every step writes each member as a PEFT adapter
  directory on tmpfs and hands vLLM the paths; vLLM reads them back and runs its own LoRA ops.
- `naive_member`: ES as in Qiu et al. 2025. One member at a time: full-rank Gaussian noise is added
  to every trained matrix in place, the member's prompts are generated, and the noise is removed.
Both run on es-serve's engine class, so model, batch and kernels other than the LoRA path are equal.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from adapters import write_peft_adapter
from es_serve.types import Generation


def _tmpfs_dir() -> str:
    # Adapters on a RAM-backed filesystem, as the official recipe does; a plain temp dir elsewhere.
    shm = "/dev/shm"
    return tempfile.mkdtemp(prefix="es-bench-", dir=shm if os.path.isdir(shm) else None)


class PeftFileStep:
    """One ES generation through adapter files loaded by path (engine built with lora_kernel='vllm')."""

    def __init__(self, engine):
        self.engine = engine
        self.next_id = 1_000_000  # apart from the engine's own ids

    def generate(self, gen: Generation, prompts, sampling) -> tuple[list, int, float, float]:
        """Returns completions, tokens, write seconds and generation seconds."""
        from vllm.lora.request import LoRARequest

        root = _tmpfs_dir()
        try:
            start = time.perf_counter()
            loras = []
            for i in range(gen.population.size):
                path = write_peft_adapter(f"{root}/m{i}", gen.population, i, self.engine.targets, gen.seed, gen.epoch)
                loras.append(LoRARequest(f"peft-{self.next_id}", self.next_id, str(path)))
                self.next_id += 1
            written = time.perf_counter() - start
            result = self.engine.generate_adapters(list(enumerate(loras)), prompts, sampling)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return result.completions, result.tokens, written, result.seconds


def naive_member(engine, base: dict[str, torch.Tensor], member: int, sigma: float, prompts, sampling, seed: int):
    """Full-rank member `member` evaluated alone; returns (tokens, seconds) including noise and restore."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed * 1_000_003 + member)
    sign = 1.0 if member % 2 == 0 else -1.0
    perturbed = {}
    for name, w in base.items():
        noise = torch.randn(w.shape, generator=g, dtype=w.dtype)
        perturbed[name] = w.add(noise, alpha=sign * sigma)
        del noise
    engine.load_state_dict(perturbed)
    del perturbed
    out = engine.generate(prompts, sampling)
    engine.load_state_dict(base)
    return sum(len(c.token_ids) for c in out), time.perf_counter() - start
