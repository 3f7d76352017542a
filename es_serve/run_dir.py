"""The run directory: resolved config, metrics, the replay log and checkpoints.

A step is committed when its line in replay.jsonl is on disk (written and fsynced); everything
else (metrics, checkpoints, the plot) can be rebuilt or redone from the replay log. So a crash or a
SIGKILL loses at most the step in progress, and checkpoints only make resuming faster.

Each replay line names the noise version its step drew ("noise", see adapters/noise.py); lines
written before the field existed drew version 1, and replay_updates redraws each step's own version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import Config, dump_config


def atomic_write(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> list[dict]:
    """Complete JSON lines; a torn last line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.toml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.replay_path = self.path / "replay.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.plot_path = self.path / "reward_curve.png"

    def create(self, config: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        atomic_write(self.config_path, dump_config(config).encode())

    def exists(self) -> bool:
        return self.config_path.is_file()

    # The replay log: one line per committed step.
    def commit_step(self, entry: dict) -> None:
        _append_line(self.replay_path, entry)

    def replay(self) -> list[dict]:
        return _read_lines(self.replay_path)

    def committed_step(self) -> int:
        entries = self.replay()
        return entries[-1]["step"] if entries else 0

    def repair(self) -> int:
        """Drops everything past the last committed step (after a crash); returns that step."""
        step = self.committed_step()
        for path in (self.replay_path, self.metrics_path):
            lines = [r for r in _read_lines(path) if r.get("step", 0) <= step]
            if path.is_file():
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in lines).encode())
        return step

    def log_metrics(self, record: dict) -> None:
        _append_line(self.metrics_path, record)

    def metrics(self) -> list[dict]:
        return _read_lines(self.metrics_path)

    # Checkpoints: float32 masters of the trained matrices, as safetensors, with the optimizer state
    # (momentum / Adam buffers and step count, keys "optimizer/...") of the same step in the same file,
    # so the two are written and renamed together.
    def save_checkpoint(
        self, step: int, weights: dict[str, torch.Tensor], keep: int = 2, optimizer_state: dict | None = None
    ) -> Path:
        from safetensors.torch import save

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"step_{step:06d}.safetensors"
        tensors = {k: v.contiguous() for k, v in weights.items()}
        tensors.update({k: v.contiguous() for k, v in (optimizer_state or {}).items()})
        blob = save(tensors, metadata={"step": str(step)})
        atomic_write(path, blob)
        for old in sorted(self.checkpoints.glob("step_*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self, at_most: int | None = None) -> tuple[int, Path | None]:
        best = (0, None)
        for path in self.checkpoints.glob("step_*.safetensors"):
            step = int(path.stem.split("_")[1])
            if (at_most is None or step <= at_most) and step >= best[0]:
                best = (step, path)
        return best

    def load_checkpoint(self, path: Path, optimizer_state: bool = False) -> dict[str, torch.Tensor]:
        """The trained matrices; with optimizer_state=True the "optimizer/..." tensors too (adapters.split_state)."""
        from safetensors.torch import load_file

        from adapters.optim import PREFIX

        tensors = load_file(str(path))
        return tensors if optimizer_state else {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
