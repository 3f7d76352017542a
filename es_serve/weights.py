"""Reading the trained matrices from a checkpoint directory, and rebuilding them from the replay log."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from adapters import Population, Target, apply_update, find_targets


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


def replay_updates(
    weights: dict[str, torch.Tensor], targets: Sequence[Target], entries: Iterable[dict], after: int, upto: int
) -> dict[str, torch.Tensor]:
    """Applies the logged updates of steps after < step <= upto, in place, from seeds and fitness."""
    for e in entries:
        if after < e["step"] <= upto:
            pop = Population(**e["population"])
            apply_update(weights, targets, pop, e["seed"], e["epoch"], e["shaped"], e["lr"], e["scaling"])
    return weights
