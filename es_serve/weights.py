"""Reading the trained matrices from a checkpoint directory, and rebuilding them from the replay log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from adapters import Optimizer, OptimizerState, Population, Target, apply_update, find_targets
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


def optimizer_of(entry: dict) -> Optimizer:
    """The optimizer a replay line's step used: its "optimizer" field; lines written before it existed used sgd."""
    try:
        return Optimizer.from_record(entry.get("optimizer"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"replay step {entry.get('step')} names an optimizer this es-serve cannot run: {exc}"
        ) from None


class MissingOptimizerState(ValueError):
    """A momentum/adam run cannot continue from a checkpoint that lacks the optimizer state."""


def _missing_state(after: int, name: str) -> MissingOptimizerState:
    return MissingOptimizerState(
        f"checkpoint step_{after:06d}.safetensors holds no optimizer state, but the run uses es.optimizer={name}, "
        "whose momentum/moments the weights alone cannot give back; move that checkpoint (and any older one without "
        "state) out of the run's checkpoints/ directory to rebuild everything from the replay log, which is exact"
    )


def replay_updates(
    weights: dict[str, torch.Tensor],
    targets: Sequence[Target],
    entries: Iterable[dict],
    after: int,
    upto: int,
    state: OptimizerState | None = None,
) -> dict[str, torch.Tensor]:
    """Applies the logged updates of steps after < step <= upto, in place, from seeds and fitness.

    Each step redraws the noise version its line names, so a run started before version 2 existed
    rebuilds its old steps with version 1 and its later steps with version 2. Each step uses the
    optimizer, learning rate and sigma its line names. `state` is the optimizer state at step `after`
    (None: none; one is started when replaying from the base model, step 0), updated in place; use
    replay_with_state to get it back when it starts as None.
    """
    replay_with_state(weights, targets, entries, after, upto, state)
    return weights


def replay_with_state(
    weights: dict[str, torch.Tensor],
    targets: Sequence[Target],
    entries: Iterable[dict],
    after: int,
    upto: int,
    state: OptimizerState | None = None,
) -> OptimizerState | None:
    """replay_updates, returning the optimizer state after step `upto` (None for an sgd run)."""
    entries = list(entries)
    versions = [noise_version(e) for e in entries]  # every line checked before any weight changes
    optimizers = [optimizer_of(e) for e in entries]
    replayed = [(e, v, o) for e, v, o in zip(entries, versions, optimizers, strict=True) if after < e["step"] <= upto]
    old = [e["step"] for e, v, _ in replayed if v == 1]
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
    for e, version, optimizer in replayed:
        if optimizer.stateful and state is None:
            if after > 0:
                raise _missing_state(after, optimizer.name)
            state = OptimizerState(optimizer.name)
        pop = Population(**e["population"])
        apply_update(
            weights, targets, pop, e["seed"], e["epoch"], e["shaped"], e["lr"], e["scaling"], version, optimizer, state
        )
    return state


def restore_run(run, targets: Sequence[Target], weights: dict[str, torch.Tensor], upto: int | None = None):
    """The run's trained matrices and optimizer state at step `upto` (default: the last committed step).

    `weights` holds the base model's float32 matrices and is updated in place: the latest checkpoint
    at or before `upto` (its optimizer state too), then the replay log after it. Returns (step, state).
    A momentum/adam run whose checkpoint lacks the optimizer state is refused (MissingOptimizerState).
    """
    from adapters import split_state

    step = run.committed_step() if upto is None else upto
    entries = run.replay()
    ckpt_step, path = run.latest_checkpoint(at_most=step)
    state = None
    if path is not None:
        saved, state = split_state(run.load_checkpoint(path, optimizer_state=True))
        weights.update(saved)
    else:
        ckpt_step = 0
    state = replay_with_state(weights, targets, entries, ckpt_step, step, state)
    last = [e for e in entries if e["step"] <= step]
    if last and state is None and optimizer_of(last[-1]).stateful:
        raise _missing_state(ckpt_step, optimizer_of(last[-1]).name)
    return step, state
