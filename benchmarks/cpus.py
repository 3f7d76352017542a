"""Which CPUs a benchmark's runs get, shared by `es-serve bench --threads` and `es-serve compare`.

Written by hand: neither vLLM nor torch exposes "the first T physical cores this process may use" as a
function, and both commands must place threads the same way for their figures to compare.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_cores() -> list[list[int]]:
    """The CPUs this process may use, grouped by physical core (SMT siblings together)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores: dict[tuple, list[int]] = {}
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = (
                topo.joinpath("physical_package_id").read_text().strip(),
                topo.joinpath("core_id").read_text().strip(),
            )
        except OSError:
            key = ("cpu", str(cpu))
        cores.setdefault(key, []).append(cpu)
    return list(cores.values())


def pick_cpus(threads: int | None) -> list[int]:
    """One CPU per physical core first (as vLLM's CPU backend binds), then SMT siblings if more are asked for."""
    cores = cpu_cores()
    order = [c[0] for c in cores] + [cpu for c in cores for cpu in c[1:]]
    return order[: threads or len(cores)]


def cpu_list(cpus: list[int]) -> str:
    """CPU ids in the form VLLM_CPU_OMP_THREADS_BIND and taskset read: "0-3,6"."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
