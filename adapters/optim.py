"""Optimizers on the ES gradient (heavy-ball momentum, Adam), with their state in float32 next to the masters.

The ES gradient of a trained matrix is what plain ES merges before the learning rate:
    g = (1 / (N sqrt r)) A diag(c) B^T        (1 / (sqrt N sqrt r) with 'sqrt' scaling),
an estimate of the gradient of the shaped fitness, which ES ascends. The rules below are the textbook
ones for ascent: they move W exactly as torch.optim.SGD(momentum=mu) / torch.optim.Adam would when fed
-g (dampening 0, no Nesterov, no weight decay; Adam with bias correction as in Kingma and Ba).

Everything here is a pure function of the gradient sequence, so every engine (and every Ray replica)
that sees the same seeds and fitness holds the same state without any of it crossing the network.
"sgd" keeps no state and is not routed through here: it stays the single in-place GEMM of update.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIMIZERS = ("sgd", "momentum", "adam")
# The names torch.optim uses for the same buffers, so a state dump reads familiar.
BUFFERS = {"sgd": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}
PREFIX = "optimizer/"


@dataclass(frozen=True)
class Optimizer:
    """Which rule turns the ES gradient into a step, and its hyper-parameters (the learning rate is per step)."""

    name: str = "sgd"
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        for key in ("momentum", "beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ValueError(f"optimizer {key} must be in [0, 1), got {value!r}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"optimizer eps must be a positive number, got {self.eps!r}")

    @property
    def stateful(self) -> bool:
        return self.name != "sgd"

    def record(self) -> dict:
        """What a replay line stores: the name and only the hyper-parameters the rule uses."""
        if self.name == "momentum":
            return {"name": "momentum", "momentum": self.momentum}
        if self.name == "adam":
            return {"name": "adam", "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}
        return {"name": "sgd"}

    @classmethod
    def from_record(cls, record: dict | Optimizer | None) -> Optimizer:
        """The inverse of record(); None (replay lines written before optimizers existed) is sgd."""
        if record is None:
            return cls()
        if isinstance(record, Optimizer):
            return record
        return cls(**record)


class OptimizerState:
    """Per trained matrix, the rule's float32 buffers (created as zeros on first use), and the step count."""

    def __init__(self, name: str, step: int = 0, buffers: dict[str, dict[str, torch.Tensor]] | None = None):
        if name not in OPTIMIZERS or name == "sgd":
            raise ValueError(f"only momentum and adam keep state, not {name!r}")
        self.name, self.step = name, step
        self.buffers: dict[str, dict[str, torch.Tensor]] = buffers or {}

    def for_param(self, param: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        held = self.buffers.get(param)
        if held is None:
            held = {kind: torch.zeros_like(like, dtype=torch.float32) for kind in BUFFERS[self.name]}
            self.buffers[param] = held
        return held

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for held in self.buffers.values() for t in held.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict for safetensors (checkpoints) and plain RPC: optimizer/<name>/<buffer>/<param>, .../step."""
        out = {f"{PREFIX}{self.name}/step": torch.tensor([self.step], dtype=torch.int64)}
        for param, held in self.buffers.items():
            for kind, t in held.items():
                out[f"{PREFIX}{self.name}/{kind}/{param}"] = t.clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor] | None) -> OptimizerState | None:
        """The inverse of tensors(); None when the dict holds no optimizer state (sgd, or an old checkpoint)."""
        mine = {k: v for k, v in (tensors or {}).items() if k.startswith(PREFIX)}
        if not mine:
            return None
        names = {k[len(PREFIX) :].split("/", 1)[0] for k in mine}
        if len(names) != 1:
            raise ValueError(f"optimizer state mixes several optimizers: {sorted(names)}")
        (name,) = names
        step_key = f"{PREFIX}{name}/step"
        if step_key not in mine:
            raise ValueError(f"optimizer state of {name} has no step count ({step_key})")
        state = cls(name, int(mine.pop(step_key).reshape(-1)[0]))
        for key, value in mine.items():
            kind, param = key[len(PREFIX) + len(name) + 1 :].split("/", 1)
            if kind not in BUFFERS[name]:
                raise ValueError(f"optimizer state of {name} has an unknown buffer {kind!r} ({key})")
            state.buffers.setdefault(param, {})[kind] = value.to(torch.float32).clone()
        return state

    def clone(self) -> OptimizerState:
        return OptimizerState(
            self.name, self.step, {p: {k: t.clone() for k, t in held.items()} for p, held in self.buffers.items()}
        )


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], OptimizerState | None]:
    """A checkpoint's tensors as (trained matrices, optimizer state or None)."""
    weights = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    return weights, OptimizerState.from_tensors(tensors)


def begin_step(optimizer: Optimizer, state: OptimizerState) -> None:
    """Counts one step (Adam's bias correction needs it); refuses a state kept for another rule."""
    if state.name != optimizer.name:
        raise ValueError(
            f"the optimizer state was kept for {state.name} but this step uses {optimizer.name}; "
            "a run keeps one es.optimizer from its first step to its last"
        )
    state.step += 1


def step_matrix(
    weight: torch.Tensor, grad: torch.Tensor, buffers: dict[str, torch.Tensor], optimizer: Optimizer, lr: float, t: int
) -> None:
    """One ascent step of `weight` (float32, in place) along the ES gradient `grad`, at step count t >= 1."""
    if optimizer.name == "momentum":
        buf = buffers["momentum_buffer"]
        buf.mul_(optimizer.momentum).add_(grad)
        weight.add_(buf, alpha=lr)
    elif optimizer.name == "adam":
        m, v = buffers["exp_avg"], buffers["exp_avg_sq"]
        b1, b2 = optimizer.beta1, optimizer.beta2
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(optimizer.eps)
        weight.addcdiv_(m, denom, value=lr / (1 - b1**t))
    else:
        raise ValueError(f"{optimizer.name} keeps no state; merge it with adapters.apply_update directly")
