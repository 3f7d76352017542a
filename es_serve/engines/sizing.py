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
    kv_cache_bytes: int | None = None  # passed to vLLM as kv_cache_memory_bytes (CPU); None: vLLM sizes it

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


@dataclass(frozen=True)
class HostMemory:
    """The memory a CPU engine is checked against: its NUMA node's, as vLLM's CPU worker reads it."""

    node: int | None
    total: int
    available: int


def host_memory() -> HostMemory:
    """Total and available bytes of the memory node vLLM's CPU worker will allocate from.

    vLLM binds its CPU worker to the NUMA node of the first CPU the process may run on and checks
    its reservations against that node's meminfo, not the machine's: on a two-node Xeon that is half
    the RAM. Asking vLLM's own helper gives the very numbers it will check; /proc/meminfo is the
    fallback where vLLM is not importable (a dense-engine-only install).
    """
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        node = get_allowed_cpu_list()[0].numa_node
        info = get_memory_node_info(node)
        return HostMemory(node, info.total_memory, info.available_memory)
    except (ImportError, IndexError, OSError, KeyError):
        pass
    fields = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = fields.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HostMemory(None, total, fields.get("MemAvailable", total))


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_memory() -> tuple[int, int]:
    """(free, total) bytes of the current CUDA device, as the driver reports them."""
    import torch

    return torch.cuda.mem_get_info()


def plan_engine(
    model_dir: Path,
    pop: Population,
    prompts_per_step: int,
    max_tokens: int,
    max_model_len: int,
    dtype: str,
    memory_fraction: float,
    max_batch: int = 512,
    memory: HostMemory | None = None,
    gpu: bool | None = None,
    device_memory: tuple[int, int] | None = None,
) -> EnginePlan:
    """LoRA slots, batch and KV size for one engine, checked against the memory it will run in.

    On CPU the KV cache is sized explicitly (vLLM's `kv_cache_memory_bytes`): exactly what the step's
    N x P sequences of `max_model_len` tokens need, capped at `memory_fraction` of the node. vLLM's
    own CPU default reserves `memory_fraction` of the node minus the process's resident memory, which
    fails or differs from machine to machine (and between two engines of one process) for reasons
    unrelated to the job. On CUDA vLLM profiles the GPU itself and `memory_fraction` keeps its meaning:
    the weights, the GPU adapter slots and the step's KV cache are checked against that share of the
    device's memory (and what is free on it), the host only against the float32 masters and the
    cached member factors it keeps.
    """
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
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's sizes there
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    inter, vocab = cfg.get("intermediate_size", 4 * hidden), cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
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
    per_token_kv = layers * 2 * kv * nbytes
    kv_bytes = max_num_seqs * max_model_len * per_token_kv

    gpu = _on_gpu() if gpu is None else gpu
    memory = host_memory() if memory is None else memory
    gib = 1 << 30
    kv_cache_bytes = None
    if not gpu:
        cap = int(memory_fraction * memory.total)
        # vLLM refuses a KV cache that cannot hold one whole sequence of max_model_len tokens.
        if cap < max_model_len * per_token_kv:
            raise MemoryError(
                f"engine.memory_fraction {memory_fraction} of {memory.total / gib:.1f} GiB cannot hold the KV cache "
                f"of one {max_model_len}-token sequence ({max_model_len * per_token_kv / gib:.2f} GiB): raise "
                "engine.memory_fraction or lower model.max_model_len"
            )
        kv_bytes = kv_cache_bytes = min(kv_bytes, cap)
    plan = EnginePlan(
        rank,
        max_loras,
        max(max_loras, pop.size),
        max_num_seqs,
        weight_bytes,
        master_bytes,
        adapter_bytes,
        kv_bytes,
        kv_cache_bytes,
    )
    if gpu:
        free, total = gpu_memory() if device_memory is None else device_memory
        slots = max_loras * rank * layers * sides * nbytes
        on_device = weight_bytes + slots + kv_bytes
        budget = min(int(memory_fraction * total), free)
        if on_device > budget:
            raise MemoryError(
                f"this configuration needs about {on_device / gib:.2f} GiB of GPU memory (weights "
                f"{weight_bytes / gib:.2f}, {max_loras} adapter slots {slots / gib:.2f}, KV cache of {max_num_seqs} "
                f"sequences x {max_model_len} tokens {kv_bytes / gib:.2f}) but engine.memory_fraction {memory_fraction} "
                f"of the GPU's {total / gib:.1f} GiB ({free / gib:.1f} GiB free) gives {budget / gib:.2f} GiB: raise "
                "engine.memory_fraction, or lower es.population, task.prompts_per_step or model.max_model_len"
            )
    # On a GPU the weights and KV cache live in device memory (checked above); the host still holds
    # the float32 masters and the cached member factors.
    needed = plan.master_bytes + plan.adapter_bytes if gpu else plan.total_bytes
    if needed > memory.available:
        where = f"NUMA node {memory.node}" if memory.node is not None else "this machine"
        raise MemoryError(
            f"this configuration needs about {needed / gib:.1f} GiB (weights {weight_bytes / gib:.1f}, float32 "
            f"masters {master_bytes / gib:.1f}, {pop.size} adapters {adapter_bytes / gib:.1f}, KV cache "
            f"{(0 if gpu else kv_bytes) / gib:.1f}) but {where} has {memory.available / gib:.1f} GiB available: "
            "lower es.population, task.prompts_per_step, model.max_model_len or es.rank, or use a smaller model"
        )
    return plan


def check_replicas_fit(plan: EnginePlan, replicas: int, memory: HostMemory | None = None) -> None:
    """Several engines started on one node share its memory; each alone would pass its own check."""
    memory = host_memory() if memory is None else memory
    needed = replicas * plan.total_bytes
    if needed > memory.available:
        gib = 1 << 30
        raise MemoryError(
            f"{replicas} replicas on this node need about {needed / gib:.1f} GiB ({plan.total_bytes / gib:.1f} each) "
            f"but it has {memory.available / gib:.1f} GiB available: lower engine.replicas or the per-engine "
            "sizes (es.population, task.prompts_per_step, model.max_model_len), or spread replicas over nodes"
        )
