"""`train.report_to`: each step's metrics line, also sent to trackio, TensorBoard and/or Weights & Biases.

Names follow what a TRL GRPOTrainer run shows in the same tools (the Hugging Face Trainer's
`train/` and `eval/` prefixes over GRPOTrainer's keys), so ES and GRPO runs plot side by side:
`reward_mean` is `train/reward`, a reward function's mean `train/rewards/<name>/mean`, completion
lengths `train/completions/mean_length`, the held-out reward `eval/reward`. The ES-only figures keep
their metrics.jsonl names under the same prefixes (`train/gen_tok_s`, `train/update_seconds`, ...).
metrics.jsonl stays the record: a reporter that fails is logged and dropped, never fails the run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

REPORTERS = ("trackio", "tensorboard", "wandb")
# metrics.jsonl name -> TRL's name, where both mean the same thing.
RENAMES = {"reward_mean": "reward", "stderr": "reward_stderr"}
PROJECT = "es-serve"


def report_names(record: dict) -> dict[str, float]:
    """One metrics line as {reported name: value}: numbers only, the step itself excluded."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        prefix, name = ("eval/", key[len("eval_") :]) if key.startswith("eval_") else ("train/", key)
        name = RENAMES.get(name, name)
        if name.startswith("reward/"):
            name = f"rewards/{name[len('reward/') :]}/mean"
        out[prefix + name] = float(value)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # Where the Hugging Face Trainer puts them too (`<output_dir>/runs`): `tensorboard --logdir` finds them.
        self.writer = SummaryWriter(log_dir=str(run_dir / "runs"))
        self.writer.add_text("config", "```\n" + _toml(config) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import trackio

        project = os.environ.get("TRACKIO_PROJECT", PROJECT)
        # The Run object, not trackio's module-level current run: a server trains jobs in its own thread.
        self.run = trackio.init(project=project, name=name, config=config, resume="allow", embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics=metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _WandB:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE")
        if not mode:
            why = _wandb_offline_reason()
            mode = "offline" if why else "online"
            if why:
                log.warning(
                    "wandb: %s, so logging offline into %s; upload later with `wandb sync %s/wandb/offline-run-*`",
                    why,
                    run_dir / "wandb",
                    run_dir,
                )
        # A stable id from the run directory, so `--resume` continues the same wandb run.
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=mode,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"trackio": _Trackio, "tensorboard": _TensorBoard, "wandb": _WandB}


def _wandb_offline_reason(timeout: float = 3.0) -> str | None:
    """Why an online wandb run cannot work here (it would hang or fail), or None when it can."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if not netrc.netrc().authenticators(url.hostname or ""):
                return "no API key (WANDB_API_KEY or `wandb login`)"
        except (OSError, netrc.NetrcParseError):
            return "no API key (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as exc:
        return f"the wandb server is unreachable ({exc})"
    return None


def _toml(config: dict) -> str:
    import tomli_w

    return tomli_w.dumps(config)


class Reporters:
    """The run's reporters; `log` takes a metrics.jsonl line as it is written."""

    def __init__(self, names: list[str], run_dir: str | Path, config: dict):
        run_dir = Path(run_dir)
        self.active: dict[str, object] = {}
        for name in names:
            try:
                self.active[name] = _CLASSES[name](run_dir, run_dir.name, config)
            except Exception as exc:  # noqa: BLE001 - metrics.jsonl remains the record
                log.warning(
                    "train.report_to: %s could not start (%s: %s); not reporting to it", name, type(exc).__name__, exc
                )

    def log(self, record: dict) -> None:
        metrics = report_names(record)
        if not metrics:
            return
        for name, reporter in list(self.active.items()):
            try:
                reporter.log(metrics, int(record["step"]))
            except Exception as exc:  # noqa: BLE001
                log.warning("train.report_to: %s failed (%s); not reporting to it any more", name, exc)
                self.active.pop(name)

    def close(self) -> None:
        for name, reporter in self.active.items():
            try:
                reporter.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("train.report_to: closing %s failed (%s)", name, exc)
        self.active = {}
