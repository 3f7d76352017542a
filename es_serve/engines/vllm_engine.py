"""The vLLM engine: one ES generation is one batched multi-LoRA `generate` call.

Every member is a rank-r LoRA adapter whose tensors the worker builds from the member's seed (see
vllm_worker.py); the driver only ever sends adapter addresses, seeds and fitness values.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters import DEFAULT_MODULES, Optimizer, Population, Target

from ..types import Completion, Generation, PopulationResult, Sampling
from .sizing import EnginePlan, plan_engine, resolve_dtype
from .vllm_worker import SCHEME, member_path, worker_extension_name

# Adapter ids of the slots a member batch is written into (see VLLMEngine._slot_ids): above any id
# `_lora` hands out (those stay below the engine's adapter capacity, or a batch's size), and within int32
# for any code that packs them.
SLOT_IDS = 1 << 30


class VLLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        population: Population,
        prompts_per_step: int,
        max_tokens: int,
        modules: Sequence[str] = DEFAULT_MODULES,
        dtype: str = "auto",
        max_model_len: int = 512,
        memory_fraction: float = 0.5,
        seed: int = 0,
        lora_kernel: str = "es",
    ):
        # In-process engine: collective_rpc then calls the worker directly, and a crash surfaces
        # here as a Python exception instead of a dead subprocess.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its per-step CPU warnings drown the progress bar
        from transformers import AutoTokenizer
        from vllm import LLM

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        dtype = self.dtype = resolve_dtype(dtype)
        self.plan: EnginePlan = plan_engine(
            model_dir, population, prompts_per_step, max_tokens, max_model_len, dtype, memory_fraction
        )
        self.model_dir, self.population = model_dir, population
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=True,
            gpu_memory_utilization=memory_fraction,
            kv_cache_memory_bytes=self.plan.kv_cache_bytes,
            enable_lora=True,
            max_lora_rank=self.plan.max_lora_rank,
            max_loras=self.plan.max_loras,
            max_cpu_loras=self.plan.max_cpu_loras,
            max_num_seqs=self.plan.max_num_seqs,
            worker_extension_cls=worker_extension_name(),
        )
        if lora_kernel not in ("es", "vllm"):
            raise ValueError(f"lora_kernel must be 'es' or 'vllm', got {lora_kernel!r}")
        rows = self._rpc("es_setup", list(modules), lora_kernel)
        self.targets = [Target(layer, param.split(".")[-2], m, n, param) for param, layer, m, n in rows]
        # Per-member adapter ids, least recently used first: bounded (see _lora), so an engine that
        # serves members one by one, or populations larger than its slots, for weeks does not grow it.
        self._lora_ids: OrderedDict[str, int] = OrderedDict()
        self._salts = 0
        # Prompt tokens whose keys and values the last `generate` read from vLLM's prefix cache.
        self.last_cached_tokens = 0

    @property
    def lora_kernel(self) -> str:
        """The LoRA path that really ran ("es-c-bf16", "es-torch-fallback", "vllm"; see member_kernel)."""
        return self._rpc("es_kernel")

    @property
    def weight_push(self) -> str:
        """How a merge reaches the model: "direct" (CPU layers repacked in place) or "reload" (vLLM's reload)."""
        return self._rpc("es_weight_push")

    def kernel_report(self) -> dict:
        return self._rpc("es_kernel_report")

    def use_kernel(self, kernel: str) -> str:
        """Serves members with the member kernel ("es") or vLLM's own LoRA ops ("vllm") from now on."""
        return self._rpc("es_use_kernel", kernel)

    def _rpc(self, method: str, *args):
        results = self.llm.collective_rpc(method, args=args)
        return results[0]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _params(self, sampling: Sampling, member: int, prompt: int):
        from vllm import SamplingParams

        if sampling.temperature == 0:
            return SamplingParams(max_tokens=sampling.max_tokens, temperature=0.0, ignore_eos=sampling.ignore_eos)
        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.request_seed(member, prompt),
            ignore_eos=sampling.ignore_eos,
        )

    def _lora(self, gen: Generation, member: int, lora_id: int | None = None, batch: frozenset = frozenset()):
        """The member's LoRARequest, under `lora_id` or an id of the engine's own.

        Own ids: one per member address while the address is among the `max_cpu_loras` most recently
        served (what vLLM's registry can hold); a new address then takes the id of the least recently
        served one not in its `batch`. An id vLLM still holds under its old member is written over by
        es_prepare before the generate, which every path through the engine calls. Names stay the
        members' addresses, which is what vLLM keys its prefix cache by.
        """
        from vllm.lora.request import LoRARequest

        path = member_path(gen.seed, gen.epoch, member, gen.population)
        if lora_id is None:
            lora_id = self._lora_ids.get(path)
            if lora_id is not None:
                self._lora_ids.move_to_end(path)
            else:
                oldest = next(iter(self._lora_ids), None)
                if len(self._lora_ids) >= self.plan.max_cpu_loras and oldest not in batch:
                    lora_id = self._lora_ids.pop(oldest)
                else:  # still filling, or a batch larger than the capacity: the ids stay 1 .. len
                    lora_id = len(self._lora_ids) + 1
                self._lora_ids[path] = lora_id
        return LoRARequest(lora_name=path, lora_int_id=lora_id, lora_path=path)

    def _run(self, requests, params, loras) -> tuple[list[Completion], float]:
        start = time.perf_counter()
        outputs = self.llm.generate(requests, params, lora_request=loras, use_tqdm=False)
        seconds = time.perf_counter() - start
        self.last_cached_tokens = sum(o.num_cached_tokens or 0 for o in outputs)
        return [Completion(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outputs], seconds

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        gen: Generation | None = None,
        member: int | None = None,
        share_prefixes: bool = True,
    ) -> list[Completion]:
        """Unperturbed model, or one member when `gen` and `member` are given.

        share_prefixes=False gives every request a cache salt of its own, so no request reuses
        another's prompt keys and values, as members never can (their adapter is part of the cache
        key); the benchmark times pure inference this way.
        """
        requests = [{"prompt_token_ids": self.encode(p)} for p in prompts]
        if not share_prefixes:
            for request in requests:
                self._salts += 1
                request["cache_salt"] = f"es-request-{self._salts}"
        params = [self._params(sampling, member or 0, j) for j in range(len(prompts))]
        loras = None
        if gen is not None:
            lora = self._lora(gen, member)
            self._rpc("es_prepare", [(lora.lora_path, lora.lora_int_id)])  # its id may hold an older member
            loras = [lora] * len(prompts)
        return self._run(requests, params, loras)[0]

    def generate_population(self, gen: Generation, prompts: Sequence[str], sampling: Sampling) -> PopulationResult:
        """All N x P requests in one `generate`: completions[i][p] is member i on prompt p."""
        return self.generate_members([(gen, i) for i in range(gen.population.size)], prompts, sampling)

    def generate_members(
        self, members: Sequence[tuple[Generation, int]], prompts: Sequence[str], sampling: Sampling
    ) -> PopulationResult:
        """Any mix of members (of any generations) on the same prompts, in one `generate`."""
        paths = [member_path(gen.seed, gen.epoch, i, gen.population) for gen, i in members]
        # A batch that fits in the slots takes the slots' ids (_slot_ids): none of the per-member ids
        # `_lora` hands out, whose table only grows, is taken for it.
        ids, batch = self._slot_id_map(paths) or {}, frozenset(paths)
        adapters = [
            (i, self._lora(gen, i, ids.get(path), batch)) for (gen, i), path in zip(members, paths, strict=True)
        ]
        return self._generate_adapters(adapters, prompts, sampling)

    def generate_adapters(self, adapters, prompts: Sequence[str], sampling: Sampling) -> PopulationResult:
        """Each (member index, LoRARequest) on every prompt in one `generate`; rows follow `adapters`.

        The index only picks the sampling seeds; the benchmark's PEFT-file baseline passes its own requests.
        """
        return self._generate_adapters(self._slot_ids(adapters), prompts, sampling)

    def _generate_adapters(self, adapters, prompts: Sequence[str], sampling: Sampling) -> PopulationResult:
        start = time.perf_counter()
        # Every member is drawn and put into a slot in one call first, so vLLM's engine steps find them
        # resident; that time counts as generation time.
        self._rpc("es_prepare", [(lora.lora_path, lora.lora_int_id) for _, lora in adapters])
        encoded = [self.encode(p) for p in prompts]
        requests, params, loras = [], [], []
        for i, lora in adapters:
            for j, ids in enumerate(encoded):
                requests.append({"prompt_token_ids": ids})
                params.append(self._params(sampling, i, j))
                loras.append(lora)
        flat, _ = self._run(requests, params, loras)
        seconds = time.perf_counter() - start
        p = len(prompts)
        rows = [flat[k * p : (k + 1) * p] for k in range(len(adapters))]
        return PopulationResult(rows, seconds, sum(len(c.token_ids) for c in flat))

    def _slot_ids(self, adapters):
        """A member batch that fits in the slots, with the ids of the last such batch: its k-th member gets
        id SLOT_IDS + k, whose slot es_prepare then overwrites with it in place (no new adapter for vLLM
        to register and activate per member and generation). Names stay the members' own, so vLLM's
        prefix cache, keyed by adapter name, never serves one member's prompt to another. Other
        batches (more members than slots, PEFT files) keep their ids."""
        from vllm.lora.request import LoRARequest

        ids = self._slot_id_map([lora.lora_path for _, lora in adapters])
        if ids is None:
            return adapters
        return [
            (i, LoRARequest(lora_name=lora.lora_name, lora_int_id=ids[lora.lora_path], lora_path=lora.lora_path))
            for i, lora in adapters
        ]

    def _slot_id_map(self, paths: Sequence[str]) -> dict[str, int] | None:
        """Each distinct member address of a batch to its slot id (SLOT_IDS + k in first-seen order), or
        None when the batch does not fit in the slots or holds anything but es-serve members."""
        distinct = list(dict.fromkeys(paths))
        if len(distinct) > self.plan.max_loras or not all(p.startswith(SCHEME) for p in distinct):
            return None
        return {path: SLOT_IDS + k for k, path in enumerate(distinct)}

    def apply_update(
        self, gen: Generation, shaped_fitness, lr: float, scaling: str = "mean", optimizer: Optimizer | None = None
    ) -> None:
        """Merges the step into the masters and the model; `checksum()` hashes them when it is wanted."""
        pop = gen.population
        spec = {"size": pop.size, "rank": pop.rank, "sigma": pop.sigma, "antithetic": pop.antithetic}
        shaped = [float(x) for x in torch.as_tensor(shaped_fitness).reshape(-1)]
        rule = Optimizer.from_record(optimizer)
        rule = rule.record() if rule.stateful else None
        self._rpc("es_apply_update", gen.seed, gen.epoch, spec, shaped, lr, scaling, rule)
        # Prefix-cache entries hold keys and values of the old weights.
        self.llm.reset_prefix_cache()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._rpc("es_get_weights")

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer state as flat tensors (adapters.OptimizerState.tensors); empty under sgd."""
        return self._rpc("es_get_optimizer_state")

    def load_state_dict(self, weights: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> str:
        """Weights and the optimizer state that goes with them; without one the optimizer starts afresh."""
        checksum = self._rpc("es_set_weights", weights, optimizer_state)
        self.llm.reset_prefix_cache()
        return checksum

    def memory(self) -> dict:
        return self._rpc("es_memory")

    def checksum(self) -> str:
        return self._rpc("es_checksum")

    def close(self) -> None:
        """Frees the engine's memory; vLLM has no public shutdown for an in-process LLM."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
