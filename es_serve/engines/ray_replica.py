"""One engine inside a Ray actor: a replica of the model that evaluates whatever members it is given.

A replica loads the model from its own disk and never receives weights in normal operation: the ES
update arrives as the generation's seed and epoch plus the N shaped fitness values, and the replica
rebuilds the same low-rank factors from the seed as every other replica does. Weights travel only to
resynchronise a replica whose checksum disagrees, or to bootstrap one that joins a running job.

Methods take and return plain values (lists, dicts, small dataclasses), so what crosses the network
is exactly what the driver measures.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from adapters import Population, merge_tolerance

from ..types import Generation, PopulationResult, Sampling


def weights_checksum(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the float32 trained matrices in name order; equal only if bitwise equal.

    One definition for every engine kind, so the driver can also compute it from a checkpoint.
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# Replicas on different CPU kinds apply the same update through different BLAS kernels, whose
# float32 summation order differs, so their weights agree only to rounding (adapters.update explains
# what is and is not bitwise). Beyond this accumulated allowance a copy of the weights is cheaper than
# trusting the sums: it resets the allowance, once every few hundred merges at N = 1024.
MAX_DRIFT = 1e-4


def drift_per_update(terms: int) -> float:
    """Relative drift one merge of `terms` (K r) GEMM terms may add between two CPU kinds.

    adapters.merge_tolerance per unit of |W|, taking the terms' sum at most |W| (at ES learning rates
    it is far smaller), so the bound is a worst case, not an estimate.
    """
    return merge_tolerance(1.0, 1.0, terms)


def weights_fingerprint(weights: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """Per trained matrix, in float64: (sum w, sum |w|, sum w^2). Sent only when checksums differ."""
    out = {}
    for name in sorted(weights):
        w = weights[name].detach().to("cpu", torch.float64)
        out[name] = (float(w.sum()), float(w.abs().sum()), float((w * w).sum()))
    return out


def within_drift(a: dict, b: dict, eps: float) -> bool:
    """Whether two fingerprints differ by no more than a relative drift `eps` of every entry."""
    if a.keys() != b.keys():
        return False
    for name, (s1a, absa, s2a) in a.items():
        s1b, absb, s2b = b[name]
        # |sum d| <= eps sum |w|, and |sum (w + d)^2 - sum w^2| <= (2 eps + eps^2) sum w^2.
        if abs(s1a - s1b) > eps * max(absa, absb) or abs(s2a - s2b) > (2 * eps + eps * eps) * max(s2a, s2b):
            return False
    return True


def population_of(spec: tuple) -> Population:
    size, rank, sigma, antithetic = spec
    return Population(size, rank, sigma, antithetic)


class Replica:
    """Wrapped with `ray.remote` by the driver; each instance owns one engine (vLLM or dense)."""

    def __init__(self, config: dict, model_dir: str):
        from ..config import validate
        from ..engines import build_local_engine

        self.config = validate(config)
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            # Another node: the driver's path does not exist here, so resolve the model name locally
            # (known names are fetched or converted into this node's cache).
            from ..models import resolve_model

            path = resolve_model(self.config.model.name)
        self.engine = build_local_engine(self.config, path)
        self._crash_at_step: int | None = None
        self._hang_at_step: int | None = None

    def info(self) -> dict:
        import socket

        return {
            "targets": list(self.engine.targets),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    # -- generation ---------------------------------------------------------------------------
    def generate_members(
        self, gen: Generation, members: list[int], prompts: list[str], sampling: Sampling
    ) -> PopulationResult:
        if self._crash_at_step is not None and gen.step == self._crash_at_step:
            os._exit(1)  # test hook: a replica lost in the middle of a step
        if self._hang_at_step is not None and gen.step == self._hang_at_step:
            time.sleep(1e6)  # test hook: a replica that stops answering without dying
        return self.engine.generate_members([(gen, i) for i in members], prompts, sampling)

    def generate(self, prompts: list[str], sampling: Sampling, gen: Generation | None, member: int | None):
        return self.engine.generate(prompts, sampling, gen, member)

    # -- weights ------------------------------------------------------------------------------
    def apply_update(
        self,
        seed: int,
        epoch: int,
        step: int,
        pop: tuple,
        shaped: list[float],
        lr: float,
        scaling: str,
        check: bool,
        optimizer: dict | None = None,
    ) -> str | None:
        gen = Generation(population_of(pop), seed, epoch, step)
        self.engine.apply_update(gen, shaped, lr, scaling, optimizer=optimizer)
        return self.checksum() if check else None

    def _everything(self) -> dict[str, torch.Tensor]:
        return {**self.engine.state_dict(), **self.engine.optimizer_state()}

    def checksum(self) -> str:
        """Over the trained matrices and the optimizer state: replicas must agree on both."""
        return weights_checksum(self._everything())

    def fingerprint(self) -> dict[str, tuple[float, float, float]]:
        return weights_fingerprint(self.engine.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.state_dict()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return self.engine.optimizer_state()

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a resynchronisation copies: the weights and the optimizer state of the same step."""
        return {"weights": self.engine.state_dict(), "optimizer": self.engine.optimizer_state()}

    def load_full_state(self, state: dict[str, dict[str, torch.Tensor]]) -> str:
        return self.load_state_dict(state["weights"], state.get("optimizer"))

    def load_state_dict(self, weights: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> str:
        self.engine.load_state_dict(weights, optimizer_state)
        return self.checksum()

    def restore(self, checkpoint: dict[str, torch.Tensor] | None, entries: list[dict], after: int | None = None) -> str:
        """Base model (already loaded), then the checkpoint (with its optimizer state) if any, then the
        replay log after it; `after` is the checkpoint's step (0 without one)."""
        from adapters import split_state

        from ..weights import replay_with_state

        weights = self.engine.state_dict()
        state = None
        if checkpoint:
            saved, state = split_state(checkpoint)
            weights.update({k: v.to(torch.float32) for k, v in saved.items()})
        if after is None:
            after = min(e["step"] for e in entries) - 1 if entries and checkpoint else 0
        if entries:
            state = replay_with_state(
                weights, self.engine.targets, entries, after=after, upto=max(e["step"] for e in entries), state=state
            )
        return self.load_state_dict(weights, state.tensors() if state is not None else None)

    # -- test hooks ---------------------------------------------------------------------------
    def crash_at_step(self, step: int | None) -> None:
        """Makes the process exit when asked to generate for `step` (fault-injection in tests)."""
        self._crash_at_step = step

    def hang_at_step(self, step: int | None) -> None:
        """Makes the replica block, alive, when asked to generate for `step` (fault-injection in tests)."""
        self._hang_at_step = step

    def drift(self, fraction: float = 0.01, seed: int = 0) -> str:
        """Moves a random `fraction` of every matrix's entries by one ulp, as another CPU's rounding would."""
        weights = self.engine.state_dict()
        gen = torch.Generator().manual_seed(seed)
        for name, w in weights.items():
            picked = torch.rand(w.shape, generator=gen) < fraction
            up = torch.nextafter(w, torch.full_like(w, float("inf")))
            weights[name] = torch.where(picked, up, w)
        return self.load_state_dict(weights, self.engine.optimizer_state())

    def corrupt(self, scale: float = 1e-3, optimizer: bool = False) -> str:
        """Nudges one trained matrix (or, with optimizer=True, one optimizer buffer), as a silent divergence would
        (checksum tests)."""
        weights, state = self.engine.state_dict(), self.engine.optimizer_state()
        if optimizer:
            name = sorted(k for k in state if not k.endswith("/step"))[0]
            state[name] = state[name] + scale
        else:
            name = sorted(weights)[0]
            weights[name] = weights[name] + scale
        return self.load_state_dict(weights, state)
