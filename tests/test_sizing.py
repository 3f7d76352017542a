"""Engine sizing: the KV cache sized to the step, checked against the memory vLLM itself will check."""

from pathlib import Path

import pytest

from adapters import Population
from es_serve.engines.sizing import HostMemory, check_replicas_fit, host_memory, plan_engine

GIB = 1 << 30


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return Path(tiny_model_dir)


def _meminfo_kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if f"{key}:" in line:
            return int(line.split(f"{key}:")[1].split()[0])
    raise KeyError(key)


def test_host_memory_is_the_numa_node_vllm_binds_to():
    memory = host_memory()
    node_file = Path(f"/sys/devices/system/node/node{memory.node}/meminfo")
    if memory.node is not None and node_file.is_file():
        expected = _meminfo_kib(node_file, "MemTotal") * 1024
    else:
        expected = _meminfo_kib(Path("/proc/meminfo"), "MemTotal") * 1024
    # vLLM clamps to a cgroup limit when one is set below the node's memory.
    assert memory.total <= expected
    assert 0 < memory.available <= memory.total


def test_kv_cache_is_exactly_what_the_step_needs_on_cpu(model_dir):
    # tiny model: 2 layers, 1 KV head of 64; N = 8 members x P = 4 prompts, 256-token context, float32.
    pop = Population(8, 1, 0.1)
    plan = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=HostMemory(0, 16 * GIB, 12 * GIB), gpu=False)
    assert plan.max_num_seqs == 32
    assert plan.kv_cache_bytes == plan.kv_bytes == 32 * 256 * (2 * 2 * 64 * 4)
    half = plan_engine(model_dir, pop, 4, 16, 256, "bfloat16", 0.3, memory=HostMemory(0, 16 * GIB, 12 * GIB), gpu=False)
    assert half.kv_cache_bytes == plan.kv_cache_bytes // 2


def test_kv_cache_is_capped_by_the_memory_fraction_and_must_hold_one_sequence(model_dir):
    pop = Population(8, 1, 0.1)
    per_sequence = 256 * 2 * 2 * 64 * 4
    memory = HostMemory(0, 100 * per_sequence, 100 * per_sequence)
    plan = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.05, memory=memory, gpu=False)
    assert plan.kv_cache_bytes == 5 * per_sequence  # 0.05 of the node, less than the 32 sequences asked
    with pytest.raises(MemoryError, match=r"raise engine.memory_fraction or lower model.max_model_len"):
        plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.005, memory=memory, gpu=False)


def test_a_node_too_small_is_refused_naming_the_node_and_what_to_lower(model_dir):
    pop = Population(8, 1, 0.1)
    plan = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=HostMemory(1, 16 * GIB, 12 * GIB), gpu=False)
    small = HostMemory(1, 16 * GIB, plan.total_bytes - 1)
    with pytest.raises(MemoryError) as exc:
        plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=small, gpu=False)
    assert "NUMA node 1" in str(exc.value) and "lower es.population" in str(exc.value)


def test_replicas_on_one_node_share_its_memory(model_dir):
    pop = Population(8, 1, 0.1)
    plan = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=HostMemory(0, 16 * GIB, 12 * GIB), gpu=False)
    room = HostMemory(0, 16 * GIB, 2 * plan.total_bytes + 1)
    check_replicas_fit(plan, 2, room)
    with pytest.raises(MemoryError, match=r"3 replicas on this node .* lower engine.replicas"):
        check_replicas_fit(plan, 3, room)


def test_on_gpu_vllm_sizes_the_cache_and_only_host_side_memory_is_checked(model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * GIB, 80 * GIB))
    pop = Population(8, 1, 0.1)
    cpu = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=HostMemory(0, 16 * GIB, 12 * GIB), gpu=False)
    host_only = cpu.master_bytes + cpu.adapter_bytes
    gpu = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=HostMemory(None, GIB, host_only), gpu=True)
    assert gpu.kv_cache_bytes is None
    with pytest.raises(MemoryError, match="this machine"):
        plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.3, memory=HostMemory(None, GIB, host_only - 1), gpu=True)


def test_on_cuda_the_kv_cache_is_checked_against_gpu_memory_not_host_ram(model_dir, monkeypatch):
    """No GPU here: torch.cuda is patched to report one, and the check must go through it."""
    import torch

    device = {"free": 80 * GIB, "total": 80 * GIB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (device["free"], device["total"]))
    pop = Population(8, 1, 0.1)
    # By hand: 8 x 4 sequences x 256 tokens x (2 layers x K and V x 64 x 4 bytes) = 8 MiB of KV cache.
    kv = 32 * 256 * 2 * 2 * 64 * 4
    assert kv == 8 << 20
    # Host RAM that could not hold that KV cache: irrelevant on CUDA, the cache lives on the device.
    host = HostMemory(None, 64 * GIB, 4 << 20)
    plan = plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.5, memory=host)
    assert plan.kv_cache_bytes is None and plan.kv_bytes == kv
    with pytest.raises(MemoryError, match=r"fraction 0.5 of the GPU's 0.0 GiB"):
        device.update(free=2 * kv, total=2 * kv)  # half of it is the KV cache alone, before the weights
        plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.5, memory=host)
    with pytest.raises(MemoryError, match="GPU memory"):
        device.update(free=kv // 2, total=80 * GIB)  # a large GPU that another process has filled
        plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.5, memory=host)
    # The CPU path is unchanged: the same host refuses the KV cache when there is no GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MemoryError, match="this machine"):
        plan_engine(model_dir, pop, 4, 16, 256, "float32", 0.5, memory=host)
