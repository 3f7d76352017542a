"""Engines: what generates a population and merges its update.

`base.Engine` is the interface; `vllm_engine` (with `vllm_worker`, the code loaded into vLLM's worker,
and `member_kernel`, the CPU LoRA kernel) is the product, `dense` the reference, `ray_engine` /
`ray_replica` spread either over a cluster, and `sizing` fits a vLLM engine to the machine. This module
builds the configured one: in this process, or replicas on a Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

from adapters import Population

from ..config import Config
from .base import Engine


def uses_ray(config: Config) -> bool:
    return config.engine.replicas > 1 or bool(config.engine.ray_address)


def build_engine(config: Config, model_dir: Path) -> Engine:
    if uses_ray(config):
        from .ray_engine import RayEngine

        return RayEngine(config, model_dir)
    return build_local_engine(config, model_dir)


def build_local_engine(config: Config, model_dir: Path) -> Engine:
    """The engine of one process; a Ray replica builds its engine with this too."""
    es = config.es
    pop = Population(es.population, es.rank, es.sigma, es.antithetic)
    if config.engine.kind == "dense":
        import torch

        from .dense import DenseEngine
        from .sizing import resolve_dtype

        dtype = getattr(torch, resolve_dtype(config.model.dtype))
        return DenseEngine(model_dir, dtype=dtype, modules=es.modules)
    from .vllm_engine import VLLMEngine

    return VLLMEngine(
        model_dir,
        pop,
        prompts_per_step=max(config.task.prompts_per_step, 1),
        max_tokens=config.generation.max_tokens,
        modules=es.modules,
        dtype=config.model.dtype,
        max_model_len=config.model.max_model_len,
        memory_fraction=config.engine.memory_fraction,
        seed=es.seed,
        lora_kernel=config.engine.lora_kernel,
    )


def plan_for(config: Config, model_dir: Path):
    """The sizing a vLLM engine built from `config` will use (es_serve.engines.sizing.plan_engine)."""
    from .sizing import plan_engine, resolve_dtype

    es = config.es
    return plan_engine(
        Path(model_dir),
        Population(es.population, es.rank, es.sigma, es.antithetic),
        max(config.task.prompts_per_step, 1),
        config.generation.max_tokens,
        config.model.max_model_len,
        resolve_dtype(config.model.dtype),
        config.engine.memory_fraction,
    )
