"""The part of es-serve that lives inside each vLLM worker (loaded as `worker_extension_cls`).

It does three things the stock worker cannot:
- builds a member's LoRA tensors from its seed when vLLM asks to load an adapter whose path is an
  `es://` address, so no adapter ever touches the disk and only seeds reach the worker;
- keeps a float32 master copy of every trained matrix and merges the ES update into it from seeds
  and shaped fitness alone (so replicas agree without shipping weights);
- pushes the merged masters back into the model through `reload_weights`, which on CPU also rebuilds
  the prepacked GEMM kernels (vLLM drops the plain weight there, so in-place edits would be lost).

Every method is called by name through `LLM.collective_rpc` and takes and returns plain values.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

from adapters import (
    Optimizer,
    OptimizerState,
    Population,
    apply_update,
    find_targets,
    member_state_dict,
    peft_config,
)

from .weights import read_safetensors

SCHEME = "es://"
# vLLM fuses these projections into one layer; a reload must supply every shard of a fused layer. (A
# checkpoint that stores them fused already, as Phi-3's qkv_proj, is one shard.)
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
SHARDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def member_path(seed: int, epoch: int, member: int, pop: Population) -> str:
    """The adapter address of one member; everything needed to rebuild it is in the string."""
    return (
        f"{SCHEME}{seed}/{epoch}/{member}?n={pop.size}&r={pop.rank}&sigma={pop.sigma!r}"
        f"&antithetic={int(pop.antithetic)}"
    )


def parse_member_path(path: str) -> tuple[int, int, int, Population]:
    url = urlparse(path)
    seed, epoch, member = int(url.netloc), *(int(x) for x in url.path.strip("/").split("/"))
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    pop = Population(int(q["n"]), int(q["r"]), float(q["sigma"]), bool(int(q["antithetic"])))
    return seed, epoch, member, pop


class ESWorkerExtension:
    """Mixed into vLLM's Worker class; `self` is the worker."""

    def es_setup(self, modules: list[str], kernel: str = "es") -> list[tuple[str, int, int, int]]:
        """Reads the trained matrices' masters and routes `es://` adapters to the seed loader.

        kernel="es" swaps in the member kernel (member_kernel.py) for the LoRA term on CPU;
        "vllm" keeps vLLM's own ops (the baseline the benchmark compares against).
        """
        model_dir = Path(self.model_runner.model_config.model)
        layers = read_safetensors(model_dir, lambda n: ".layers." in n)
        targets = find_targets(layers, modules)
        trained = {t.param for t in targets}
        # vLLM's layerwise reload processes a layer once all its tensors have arrived, and a partly
        # supplied one only at the end, re-allocating the tensors it did not get. So every tensor of a
        # touched layer is supplied: the untrained shards of a fused layer (q/k/v, gate/up) and every
        # bias (Qwen2's) ride along unchanged.
        companions = set()
        for t in targets:
            prefix = t.param.rsplit(".", 2)[0]
            shards = SHARDS.get(FUSED.get(t.module), (t.module,))
            companions.update(f"{prefix}.{shard}.{kind}" for shard in shards for kind in ("weight", "bias"))
        self._es_targets = targets
        self._es_master = {n: w for n, w in layers.items() if n in trained or n in companions}
        # Momentum / Adam buffers, float32 next to the masters; rebuilt from seeds and fitness like them.
        self._es_optim: OptimizerState | None = None
        self._es_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._es_cache_epoch = None
        # A partial reload is the point here: norms and embeddings are frozen, so vLLM's per-merge
        # warnings that they were "not loaded" are expected and would flood the log.
        for name in ("layerwise", "inplace"):
            logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").setLevel(logging.ERROR)
        manager = self.model_runner.lora_manager
        if not hasattr(manager, "_es_original_load"):
            manager._es_original_load = manager._load_adapter
        manager._load_adapter = self._es_load_adapter
        self._es_kernel = False
        if kernel == "es":
            from .member_kernel import install

            wrappers = manager._adapter_manager.punica_wrapper_mapping.values()
            self._es_kernel = all([install(w) for w in wrappers])
        return [(t.param, t.layer, t.out_features, t.in_features) for t in targets]

    def _es_load_adapter(self, request):
        manager = self.model_runner.lora_manager
        if not request.lora_path.startswith(SCHEME):
            return manager._es_original_load(request)
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        seed, epoch, member, pop = parse_member_path(request.lora_path)
        # Adapters of one noise epoch are rebuilt from this cache after a merge drops vLLM's copies.
        if self._es_cache_epoch != (seed, epoch):
            self._es_cache, self._es_cache_epoch = {}, (seed, epoch)
        tensors = self._es_cache.get(request.lora_path)
        if tensors is None:
            tensors = member_state_dict(pop, member, self._es_targets, seed, epoch)
            self._es_cache[request.lora_path] = tensors
        config = peft_config(pop.rank, sorted({t.module for t in self._es_targets}))
        config["vllm_max_position_embeddings"] = manager.max_position_embeddings
        helper = PEFTHelper.from_dict(config)
        helper.validate_legal(manager.lora_config)
        # Cloned because vLLM packs and rescales the tensors it is given in place.
        return LoRAModel.from_lora_tensors(
            lora_model_id=request.lora_int_id,
            tensors={k: v.clone() for k, v in tensors.items()},
            peft_helper=helper,
            device="cpu",
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
        )

    def es_apply_update(
        self,
        seed: int,
        epoch: int,
        pop: dict,
        shaped: list[float],
        lr: float,
        scaling: str,
        optimizer: dict | None = None,
    ) -> str:
        population = Population(**pop)
        rule = Optimizer.from_record(optimizer)
        if rule.stateful and self._es_optim is None:
            self._es_optim = OptimizerState(rule.name)
        apply_update(
            self._es_master,
            self._es_targets,
            population,
            seed,
            epoch,
            shaped,
            lr,
            scaling,
            optimizer=rule,
            state=self._es_optim,
        )
        self._es_push()
        return self.es_checksum()

    def es_set_weights(self, weights: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> str:
        """Trained weights and their optimizer state (without one, the optimizer starts afresh)."""
        for name in weights:
            if name not in self._es_master:
                raise KeyError(f"{name} is not a trained weight of this engine")
        state = OptimizerState.from_tensors(optimizer_state)
        for name, value in weights.items():
            self._es_master[name].copy_(value)
        self._es_optim = state
        self._es_push()
        return self.es_checksum()

    def es_get_weights(self) -> dict[str, torch.Tensor]:
        trained = {t.param for t in self._es_targets}
        return {k: v.clone() for k, v in self._es_master.items() if k in trained}

    def es_get_optimizer_state(self) -> dict[str, torch.Tensor]:
        return self._es_optim.tensors() if self._es_optim is not None else {}

    def es_kernel(self) -> str:
        """The LoRA path that really served members: "es-c-<dtype>", "es-torch-fallback", "vllm"...

        See member_kernel.describe; "es-idle" until a member batch has run.
        """
        return self.es_kernel_report()["kernel"]

    def es_kernel_report(self) -> dict:
        """Kernel and fallback call counts (with reasons), threads, and what the kernel build can do."""
        from .member_kernel import report

        return report(self.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values())

    def es_use_kernel(self, kernel: str) -> str:
        """Switches this engine between the member kernel ("es") and vLLM's own LoRA ops ("vllm")."""
        from .member_kernel import install, uninstall

        wrappers = self.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values()
        if kernel == "es":
            self._es_kernel = all([install(w) for w in wrappers])
        elif kernel == "vllm":
            for w in wrappers:
                uninstall(w)
            self._es_kernel = False
        else:
            raise ValueError(f"kernel must be 'es' or 'vllm', got {kernel!r}")
        return self.es_kernel()

    def es_memory(self) -> dict:
        """Bytes held for members: the seed-built factors cached for this epoch, and vLLM's slots."""
        cache = sum(t.numel() * t.element_size() for tensors in self._es_cache.values() for t in tensors.values())
        slots = 0
        for module in self.model_runner.model.modules():
            for name in ("lora_a_stacked", "lora_b_stacked"):
                stacked = getattr(module, name, None)
                for t in [stacked] if isinstance(stacked, torch.Tensor) else stacked or ():
                    slots += t.numel() * t.element_size()
        optim = self._es_optim.nbytes() if self._es_optim is not None else 0
        return {
            "member_cache_bytes": cache,
            "members_cached": len(self._es_cache),
            "lora_slot_bytes": slots,
            "optimizer_state_bytes": optim,
        }

    def es_checksum(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self._es_master):
            digest.update(name.encode())
            digest.update(self._es_master[name].numpy().tobytes())
        return digest.hexdigest()

    def _es_push(self) -> None:
        self.reload_weights(weights_iterator=iter(list(self._es_master.items())), is_checkpoint_format=True)


def worker_extension_name() -> str:
    return f"{ESWorkerExtension.__module__}.{ESWorkerExtension.__qualname__}"
