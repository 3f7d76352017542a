"""Reading the trained matrices from a checkpoint directory, and rebuilding them from the replay log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from adapters import Population, Target, apply_update, find_targets
from adapters.noise import NOISE_VERSION, NOISE_VERSIONS

log = logging.getLogger(__name__)


def read_safetensors(model_dir: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Every tensor whose name passes `wanted`, as float32."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}; es-serve needs safetensors checkpoints")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if wanted(name):
                    out[name] = f.get_tensor(name).to(torch.float32)
    return out


def base_weights(model_dir: Path, modules: Sequence[str]) -> tuple[list[Target], dict[str, torch.Tensor]]:
    """The perturbed matrices of a model directory and their float32 values."""
    layers = read_safetensors(model_dir, lambda n: ".layers." in n)
    targets = find_targets(layers, modules)
    return targets, {t.param: layers[t.param] for t in targets}


def noise_version(entry: dict) -> int:
    """The noise a replay line's step drew: its "noise" field; lines written before it existed drew 1."""
    version = entry.get("noise", 1)
    if isinstance(version, bool) or version not in NOISE_VERSIONS:
        known = ", ".join(str(v) for v in NOISE_VERSIONS)
        raise ValueError(
            f"replay step {entry.get('step')} names noise version {version!r}, which this es-serve cannot draw "
            f"(it knows {known}); use the es-serve release that wrote the run"
        )
    return version


def replay_updates(
    weights: dict[str, torch.Tensor], targets: Sequence[Target], entries: Iterable[dict], after: int, upto: int
) -> dict[str, torch.Tensor]:
    """Applies the logged updates of steps after < step <= upto, in place, from seeds and fitness.

    Each step redraws the noise version its line names, so a run started before version 2 existed
    rebuilds its old steps with version 1 and its later steps with version 2.
    """
    entries = list(entries)
    versions = [noise_version(e) for e in entries]  # every line checked before any weight changes
    replayed = [(e, v) for e, v in zip(entries, versions, strict=True) if after < e["step"] <= upto]
    old = [e["step"] for e, v in replayed if v == 1]
    if old:
        log.warning(
            "replaying steps %d..%d with noise version 1 (torch.randn): its float32 bits depend on torch's CPU "
            "kernels (AVX2/AVX-512 vs the generic kernels of ARM and older x86), so these weights equal the "
            "trained ones only on a machine whose torch draws the same bits as the training machine's; steps "
            "drawn with noise version %d rebuild exactly everywhere",
            old[0],
            old[-1],
            NOISE_VERSION,
        )
    for e, version in replayed:
        pop = Population(**e["population"])
        apply_update(weights, targets, pop, e["seed"], e["epoch"], e["shaped"], e["lr"], e["scaling"], version)
    return weights
