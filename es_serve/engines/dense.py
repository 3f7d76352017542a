"""The dense reference engine: member i runs as a plain transformers model with W + E_i written in.

Slow by design and independent of every LoRA code path: it builds E_i = s_i (sigma / sqrt r) A_i B_i^T
in float64 straight from the seeded noise factors, never through the adapter tensors, and adds it to
the weights. So a wrong LoRA layout or scaling in the fast engines shows up against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from adapters import (
    DEFAULT_MODULES,
    NoiseKey,
    Optimizer,
    OptimizerState,
    Population,
    Target,
    apply_update,
    find_targets,
    pair_factors,
)

from ..types import Completion, Generation, PopulationResult, Sampling


def reference_delta(pop: Population, member: int, target: Target, seed: int, epoch: int) -> torch.Tensor:
    """E_i = s_i (sigma / sqrt r) A B^T in float64, from the EGGROLL definition alone.

    Member 2k and 2k+1 share pair k's draw with signs +1 and -1 (member i is draw i without
    antithetic pairs); A and B are the first m and last n rows of the pair's (m + n) x r draw.
    """
    pair = member // 2 if pop.antithetic else member
    sign = -1.0 if pop.antithetic and member % 2 else 1.0
    key = NoiseKey(seed, epoch, pair, target.layer, target.module)
    a, b = pair_factors(key, target.out_features, target.in_features, pop.rank)
    return (sign * pop.sigma / math.sqrt(pop.rank)) * (a.to(torch.float64) @ b.to(torch.float64).T)


class DenseEngine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float64,
        modules: Sequence[str] = DEFAULT_MODULES,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # Eager attention is the plain math; transformers' SDPA path skips Gemma 2's attention soft-capping.
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
        self.model = self.model.to(device)
        self.model.eval()
        self.dtype, self.device = dtype, device
        self.params = dict(self.model.named_parameters())
        self.targets = find_targets(self.params, modules)
        # float32 masters, as in the vLLM engine, so both engines round the same way.
        self.master = {t.param: self.params[t.param].detach().to("cpu", torch.float32).clone() for t in self.targets}
        # Momentum / Adam buffers, float32 next to the masters (None until a stateful step or under sgd).
        self.optimizer: OptimizerState | None = None
        self._sync()

    def _sync(self) -> None:
        with torch.no_grad():
            for t in self.targets:
                self.params[t.param].copy_(self.master[t.param].to(self.device, self.dtype))

    @contextmanager
    def perturbed(self, gen: Generation | None, member: int | None):
        """Weights W + E_member while inside; exactly W again afterwards."""
        if gen is None:
            yield
            return
        try:
            with torch.no_grad():
                for t in self.targets:
                    w = self.master[t.param].to(torch.float64)
                    w = w + reference_delta(gen.population, member, t, gen.seed, gen.epoch)
                    self.params[t.param].copy_(w.to(self.device, self.dtype))
            yield
        finally:
            self._sync()

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int], gen: Generation | None = None, member: int | None = None):
        ids = torch.tensor([list(token_ids)], device=self.device)
        with self.perturbed(gen, member):
            return self.model(ids).logits[0].to(torch.float64).cpu()

    @torch.no_grad()
    def _generate_one(self, ids: list[int], sampling: Sampling, request_seed: int) -> Completion:
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            attention_mask=torch.ones_like(input_ids),
        )
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = sampling.max_tokens
        if sampling.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(request_seed)
            out = self.model.generate(input_ids, **kwargs)[0, len(ids) :].tolist()
        return Completion(self.tokenizer.decode(out, skip_special_tokens=True), out)

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        gen: Generation | None = None,
        member: int | None = None,
    ) -> list[Completion]:
        with self.perturbed(gen, member):
            return [
                self._generate_one(self.encode(p), sampling, sampling.request_seed(member or 0, j))
                for j, p in enumerate(prompts)
            ]

    def generate_population(self, gen: Generation, prompts: Sequence[str], sampling: Sampling) -> PopulationResult:
        start = time.perf_counter()
        completions = [self.generate(prompts, sampling, gen, i) for i in range(gen.population.size)]
        tokens = sum(len(c.token_ids) for row in completions for c in row)
        return PopulationResult(completions, time.perf_counter() - start, tokens)

    def generate_members(
        self, members: Sequence[tuple[Generation, int]], prompts: Sequence[str], sampling: Sampling
    ) -> PopulationResult:
        """Any subset of members (of any generations) on the same prompts; rows in the order given."""
        start = time.perf_counter()
        completions = [self.generate(prompts, sampling, gen, i) for gen, i in members]
        tokens = sum(len(c.token_ids) for row in completions for c in row)
        return PopulationResult(completions, time.perf_counter() - start, tokens)

    def apply_update(
        self, gen: Generation, shaped_fitness, lr: float, scaling: str = "mean", optimizer: Optimizer | None = None
    ) -> None:
        optimizer = Optimizer.from_record(optimizer)
        if optimizer.stateful and self.optimizer is None:
            self.optimizer = OptimizerState(optimizer.name)
        apply_update(
            self.master,
            self.targets,
            gen.population,
            gen.seed,
            gen.epoch,
            shaped_fitness,
            lr,
            scaling,
            optimizer=optimizer,
            state=self.optimizer,
        )
        self._sync()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.master.items()}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer state as flat tensors (adapters.OptimizerState.tensors); empty under sgd."""
        return self.optimizer.tensors() if self.optimizer is not None else {}

    def load_state_dict(self, weights: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> None:
        """Weights and the optimizer state that goes with them; without one the optimizer starts afresh."""
        for t in self.targets:
            self.master[t.param].copy_(weights[t.param])
        self.optimizer = OptimizerState.from_tensors(optimizer_state)
        self._sync()
