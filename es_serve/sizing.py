"""Sizes vLLM's LoRA slots and batch from the population, and refuses what cannot fit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from adapters import Population

# vLLM accepts only these values for max_lora_rank; every adapter slot is padded to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class EnginePlan:
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    max_num_seqs: int
    weight_bytes: int
    master_bytes: int
    adapter_bytes: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.master_bytes + self.adapter_bytes + self.kv_bytes


def resolve_dtype(dtype: str) -> str:
    """'auto' picks bfloat16 only where it is fast: CUDA, or CPUs with native bf16 instructions.

    On a CPU without them (AVX2 only) vLLM's oneDNN GEMM refuses bf16 and falls back to a plain
    torch matmul that is several times slower than float32.
    """
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _total_memory()


def plan_engine(
    model_dir: Path,
    pop: Population,
    prompts_per_step: int,
    max_tokens: int,
    max_model_len: int,
    dtype: str,
    memory_fraction: float,
    max_batch: int = 512,
    available: int | None = None,
) -> EnginePlan:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model dtype {dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
    if not 0 < memory_fraction < 1:
        raise ValueError(f"engine memory fraction must be in (0, 1), got {memory_fraction}")
    if prompts_per_step < 1:
        raise ValueError(f"task.prompts_per_step must be >= 1, got {prompts_per_step}")
    if max_tokens >= max_model_len:
        raise ValueError(
            f"generation.max_tokens ({max_tokens}) leaves no room for the prompt in max_model_len "
            f"({max_model_len}): lower generation.max_tokens or raise engine.max_model_len"
        )
    rank = next((r for r in VLLM_LORA_RANKS if r >= pop.rank), None)
    if rank is None:
        raise ValueError(f"es.rank {pop.rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    inter, vocab = cfg.get("intermediate_size", 4 * hidden), cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    sides = (hidden + q) + 2 * (hidden + kv) + (q + hidden) + 3 * (hidden + inter)
    nbytes = DTYPE_BYTES[dtype]

    requests = pop.size * prompts_per_step
    max_num_seqs = min(requests, max_batch)
    max_loras = min(pop.size, max_num_seqs)
    weight_bytes = (layers * per_layer + vocab * hidden) * nbytes
    master_bytes = layers * per_layer * 4
    # GPU-side slots plus the CPU cache that holds every member of a step.
    adapter_bytes = (max_loras + pop.size) * rank * layers * sides * nbytes
    kv_bytes = max_num_seqs * max_model_len * layers * 2 * kv * nbytes
    plan = EnginePlan(
        rank, max_loras, max(max_loras, pop.size), max_num_seqs, weight_bytes, master_bytes, adapter_bytes, kv_bytes
    )

    available = _available_memory() if available is None else available
    reserved = int(memory_fraction * _total_memory())
    needed = plan.weight_bytes + plan.master_bytes + plan.adapter_bytes
    if needed + reserved > available:
        gib = 1 << 30
        raise MemoryError(
            f"this configuration needs about {needed / gib:.1f} GiB for weights, float32 masters and "
            f"{pop.size} adapters, plus {reserved / gib:.1f} GiB that vLLM reserves "
            f"(engine memory fraction {memory_fraction}), but only {available / gib:.1f} GiB is free: "
            "lower engine.memory_fraction, es.population or es.rank, or use a smaller model"
        )
    return plan
