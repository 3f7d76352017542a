"""`es-serve export`: a run's trained weights as a Hugging Face model directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .config import load_config
from .run_dir import RunDir
from .weights import base_weights, replay_updates


def trained_weights(run: RunDir, model_dir: Path, modules) -> tuple[int, dict[str, torch.Tensor]]:
    """The weights at the last committed step: latest checkpoint plus the replay log after it."""
    step = run.committed_step()
    ckpt_step, path = run.latest_checkpoint(at_most=step)
    targets, weights = base_weights(model_dir, modules)
    if path is not None:
        weights.update(run.load_checkpoint(path))
    else:
        ckpt_step = 0
    return step, replay_updates(weights, targets, run.replay(), ckpt_step, step)


def export_run(run_dir: Path, out_dir: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .models import resolve_model

    run = RunDir(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run_dir} is not an es-serve run directory (config.toml is missing)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory")
    config = load_config(run.config_path)
    model_dir = resolve_model(config.model.name)
    step, trained = trained_weights(run, model_dir, config.es.modules)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, tmp / item.name)
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                original = f.get_tensor(name)
                tensors[name] = trained[name].to(original.dtype) if name in trained else original
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "es_serve_step": str(step)})
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir
