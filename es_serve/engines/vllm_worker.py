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

import contextlib
import functools
import hashlib
import logging
import math
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

from adapters import Optimizer, OptimizerState, Population, apply_update, find_targets, peft_config
from adapters.noise import NoiseKey, draw_block

from ..weights import read_safetensors

SCHEME = "es://"
# vLLM fuses these projections into one layer; a reload must supply every shard of a fused layer. (A
# checkpoint that stores them fused already, as Phi-3's qkv_proj, is one shard.)
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
SHARDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


# LoRA layers with a vocabulary-wide table, which ES members never write (they train decoder blocks).
VOCAB_LORA_LAYERS = ("LogitsProcessorWithLoRA", "VocabParallelEmbeddingWithLoRA")


def _skip_clean_resets(module) -> None:
    """Makes a LoRA layer's `reset_lora` skip a slot that is all zeros since its last reset.

    vLLM zeroes every layer's slot when it activates an adapter that has no weights there; for the
    logits and embedding layers that is a vocabulary-wide table per member, a third of the time it
    took to put 32 members into slots. Only `set_lora` writes a slot, so a slot reset and not
    written since is still zero. Patched on the instance; idempotent.
    """
    if getattr(module, "_es_clean_slots", None) is not None:
        return
    clean: set[int] = set()
    module._es_clean_slots = clean
    reset, write = module.reset_lora, module.set_lora

    def reset_lora(index: int):
        if index not in clean:
            reset(index)
            clean.add(index)

    def set_lora(index: int, *args, **kwargs):
        clean.discard(index)
        return write(index, *args, **kwargs)

    module.reset_lora, module.set_lora = reset_lora, set_lora


def _queue_slot_writes(module) -> None:
    """Lets `es_prepare` put many members into a linear LoRA layer's slots with a few tensor writes.

    vLLM's activation calls `set_lora` once per member and layer: a slot reset and a copy per slice,
    each a handful of small tensor operations, which added up to a few percent of a generation at
    N = 32. While `_es_slot_queue` is a dict (only inside `es_prepare`), `set_lora` queues its
    arguments instead; `_write_queued_slots` then writes them all per slice with one indexed copy,
    with the same result. Anything it does not handle (tensor parallel slicing, packed groups that do
    not match the slices) takes vLLM's own `set_lora`. Patched on the instance; idempotent.
    """
    if hasattr(module, "_es_slot_queue"):
        return
    module._es_slot_queue = None
    write = module.set_lora

    def set_lora(index: int, lora_a, lora_b):
        queue = module._es_slot_queue
        if queue is not None:
            parts = [*lora_a, *lora_b] if isinstance(lora_a, list) and isinstance(lora_b, list) else [lora_a, lora_b]
        if (
            queue is None
            or getattr(module, "tp_size", 1) != 1
            or len(parts) != 2 * module.n_slices
            or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in parts)
        ):
            if queue:  # keep the order of writes to this layer
                _write_queued_slots(module)
                module._es_slot_queue = {}
            return write(index, lora_a, lora_b)
        queue[index] = (lora_a, lora_b)
        return None

    module._es_set_lora_one = write
    module.set_lora = set_lora


def _write_queued_slots(module) -> None:
    """Writes the slots `set_lora` queued (see _queue_slot_writes): per slice, one call of the member
    kernel's library (`_write_slots_native`) where it is built, else one indexed copy."""
    queue, module._es_slot_queue = module._es_slot_queue, None
    if not queue:
        return
    index = torch.tensor(list(queue))
    entries = [tuple(list(x) if isinstance(x, (list, tuple)) else [x] for x in pair) for pair in queue.values()]
    for k in range(module.n_slices):
        for stacked, part in ((module.lora_a_stacked[k], 0), (module.lora_b_stacked[k], 1)):
            sources = [entry[part][k] for entry in entries]
            shape = sources[0].shape
            if any(t.shape != shape for t in sources):  # mixed ranks: vLLM's writes, one at a time
                for i, (lora_a, lora_b) in queue.items():
                    module._es_set_lora_one(i, lora_a, lora_b)
                return
            if _write_slots_native(stacked, index, sources):
                continue
            source = torch.stack(sources).to(stacked.dtype).unsqueeze(1)
            rows, cols = shape
            if (rows, cols) == tuple(stacked.shape[2:]):
                stacked.index_copy_(0, index, source)
                continue
            # Written through views of the used block, and the rest of each slot zeroed as vLLM's reset
            # does (padding rows beyond the rank): no padded copy of every member is built first.
            stacked[:, :, :rows, :cols].index_copy_(0, index, source)
            if rows < stacked.shape[2]:
                stacked[:, :, rows:, :].index_fill_(0, index, 0)
            if cols < stacked.shape[3]:
                stacked[:, :, :rows, cols:].index_fill_(0, index, 0)


@contextlib.contextmanager
def _slot_writes_queued(slots):
    """vLLM's slot writes inside the block queued per layer and written at its end (_queue_slot_writes),
    even if an activation failed: the adapters vLLM marked active must hold their weights."""
    queued = [m for m in slots.modules.values() if hasattr(m, "_es_slot_queue")]
    for module in queued:
        module._es_slot_queue = {}
    try:
        yield
    finally:
        for module in queued:
            _write_queued_slots(module)


def _write_slots_native(stacked: torch.Tensor, index: torch.Tensor, sources: list[torch.Tensor]) -> bool:
    """One slice's queued writes by the member kernel's library, straight from each adapter's tensor.

    False (nothing written) when the library is not built or the tensors are not plain contiguous CPU
    tensors of the slots' dtype; the caller then writes them with torch.
    """
    import ctypes

    from .member_kernel import load, worker_threads

    rows, cols = sources[0].shape
    if (
        stacked.device.type != "cpu"
        or not stacked.is_contiguous()
        or stacked.dim() != 4
        or stacked.shape[1] != 1
        or not 0 <= int(index.min()) <= int(index.max()) < stacked.shape[0]
        or rows > stacked.shape[2]
        or cols > stacked.shape[3]
        or stacked.element_size() not in (2, 4)
        or not all(t.dtype == stacked.dtype and t.is_contiguous() and t.device.type == "cpu" for t in sources)
    ):
        return False
    lib = load()
    if lib is None:
        return False
    count = len(sources)
    pointers = (ctypes.c_void_p * count)(*[t.data_ptr() for t in sources])
    lib.es_write_slots(
        stacked.data_ptr(), stacked.shape[2], stacked.shape[3], index.data_ptr(), pointers, count, rows, cols,
        stacked.element_size(), worker_threads(),
    )  # fmt: skip
    # Written through raw pointers: bump the version counter as torch's own in-place writes do, which
    # the member kernel's layer plans watch to re-read the slots.
    torch.autograd.graph.increment_version(stacked)
    return True


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

        kernel="es" swaps in the member kernel (member_kernel.py) for the LoRA term on CPU, and on CPUs
        with AMX, if asked for (ES_SERVE_FUSED_GEMM=1), the fused GEMM (member_gemm.py) for the trained
        layers in bfloat16; "vllm" keeps vLLM's own ops (the baseline the benchmark compares against).
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
        self._es_cache: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._es_draw_buffer: torch.Tensor | None = None
        self._es_drawn = None  # (rank, {(seed, epoch, draw, sigma): row}, block) of the last draw
        self._es_offsets = {}  # each target's offset in a draw's row, the order _es_build lays them in
        offset = 0
        for t in targets:
            self._es_offsets[t.param] = offset
            offset += t.out_features + t.in_features
        self._es_cache_epoch = None
        # Which member each adapter id's slot holds (valid while the id is active) and which member each
        # id was registered with: the engine reuses ids from one generation to the next, and a slot whose
        # id vLLM activates again gets the registered member back (see _es_watch_activation).
        self._es_slot_path: dict[int, str] = {}
        self._es_loaded_path: dict[int, str] = {}
        self._es_slot_jobs = None  # (rank, jobs, tensors written) for es_write_drawn_slots, made once per rank
        # Members put into slots by es_prepare, by how (the engine report's "slot_members").
        self._es_slot_counts = {"loaded_by_vllm": 0, "written_in_place": 0, "reloaded_by_vllm": 0}
        # A partial reload is the point here: norms and embeddings are frozen, so vLLM's per-merge
        # warnings that they were "not loaded" are expected and would flood the log.
        for name in ("layerwise", "inplace"):
            logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").setLevel(logging.ERROR)
        manager = self.model_runner.lora_manager
        if not hasattr(manager, "_es_original_load"):
            manager._es_original_load = manager._load_adapter
        manager._load_adapter = self._es_load_adapter
        if not hasattr(manager, "_es_original_apply"):
            manager._es_original_apply = manager._apply_adapters
        manager._apply_adapters = self._es_apply_adapters
        self._es_helper = None
        self.__dict__.pop("_es_direct", None)  # planned at the first push, for these targets
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        self._es_watch_activation()
        for module in manager._adapter_manager.modules.values():
            if type(module).__name__ in VOCAB_LORA_LAYERS:
                _skip_clean_resets(module)
            elif isinstance(module, BaseLinearLayerWithLoRA):
                _queue_slot_writes(module)
        self._es_kernel = False
        from .member_gemm import restore

        restore(getattr(self, "_es_gemm", []))  # a second setup starts from vLLM's GEMM again
        self._es_gemm = []
        if kernel == "es":
            from .member_kernel import install

            wrappers = manager._adapter_manager.punica_wrapper_mapping.values()
            self._es_kernel = all([install(w) for w in wrappers])
            if self._es_kernel:
                self._es_install_gemm()
        return [(t.param, t.layer, t.out_features, t.in_features) for t in targets]

    def _es_install_gemm(self) -> None:
        """The fused AMX GEMM on the trained layers where it runs (member_gemm.py); none elsewhere.

        Needs the direct weight push: the GEMM packs the weights each merge gives the layer.
        """
        from . import member_gemm

        if not (member_gemm.enabled() and member_gemm.supported()) or self.es_weight_push() != "direct":
            return
        by_base = {
            id(m.base_layer): m
            for m in self.model_runner.lora_manager._adapter_manager.modules.values()
            if hasattr(m, "base_layer") and hasattr(m, "lora_a_stacked")
        }
        layers = []
        for layer, shards in self._es_direct:
            lora_layer = by_base.get(id(layer))
            if lora_layer is None:
                return  # a trained layer vLLM serves without LoRA: leave every layer on vLLM's GEMM
            layers.append((layer, lora_layer, self._es_layer_weight(layer, shards)))
        self._es_gemm = member_gemm.install(layers)

    def _es_apply_adapters(self, requests) -> None:
        """vLLM's per-engine-step adapter activation, skipped when every requested adapter is in a slot.

        vLLM calls this before every forward pass and, per requested adapter, copies its table of
        registered adapters and touches two LRU entries: at N = 128 that is hundreds of dict copies per
        decode step for nothing, since the batch's members were put in slots by `es_prepare` (or by
        the step that first needed them) and nothing else evicts them. Any missing adapter, or an
        in-place reload, takes vLLM's own path, which touches every requested one before it evicts.
        """
        manager = self.model_runner.lora_manager
        active = manager._adapter_manager._active_adapters
        for request in requests:
            if request and (request.lora_int_id not in active or request.load_inplace):
                return manager._es_original_apply(requests)
        return None

    def _es_build(self, paths: list[str]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """(lora_A, lora_B) per vLLM module of the listed members; those not cached are drawn in one pass.

        The two members of an antithetic pair share their draw, so it is drawn once. Tensors are kept
        in vLLM's LoRA dtype, the form its slots take them in, so loading copies without converting.
        Laid out per matrix for all new members at once (a handful of tensor operations per matrix,
        not per member and matrix): each member's tensors are rows of those, r (m + n) numbers per
        member and matrix, of which a pair shares A's r n.
        """
        out = {p: self._es_cache[p] for p in paths if p in self._es_cache}
        draws: dict[int, dict[tuple[int, int, int, float], list[tuple[str, int, Population]]]] = {}
        for path in dict.fromkeys(paths):
            if path not in out:
                seed, epoch, member, pop = parse_member_path(path)
                key = (seed, epoch, pop.draw_of(member), pop.sigma)
                draws.setdefault(pop.rank, {}).setdefault(key, []).append((path, member, pop))
        targets = self._es_targets
        dtype = self.model_runner.lora_manager.lora_config.lora_dtype
        shapes = [(t.out_features, t.in_features) for t in targets]
        for rank, by_draw in draws.items():
            block = self._es_draw(rank, list(by_draw))
            # Per draw, not per member: the two members of a pair share A's side (the same tensor, as
            # vLLM copies it into its slots and never writes it) and B's differs only by the sign,
            # applied once per draw by an exact negation. The products are lora_from_factors' float32
            # ones (sqrt(sigma) on A's side, sqrt(sigma / r) on B's), so the bits are its bits.
            coeff_a = torch.tensor([math.sqrt(k[3]) for k in by_draw], dtype=torch.float32).view(-1, 1, 1)
            coeff_b = torch.tensor([math.sqrt(k[3] / rank) for k in by_draw], dtype=torch.float32).view(-1, 1, 1)
            members = [
                (path, row, pop.sign_of(member))
                for row, group in enumerate(by_draw.values())
                for path, member, pop in group
            ]
            negative = any(sign < 0 for _, _, sign in members)
            tensors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in members]
            offset = 0
            for target, (m, n) in zip(targets, shapes, strict=True):
                z = block[:, offset : offset + (m + n) * rank].unflatten(1, (m + n, rank))
                offset += (m + n) * rank
                lora_a = (z[:, m:].transpose(1, 2) * coeff_a).to(dtype).contiguous()  # (draws, r, n)
                lora_b = (z[:, :m] * coeff_b).to(dtype).contiguous()  # (draws, m, r)
                a_rows, b_rows = lora_a.unbind(0), lora_b.unbind(0)
                b_neg = torch.neg(lora_b).unbind(0) if negative else b_rows
                name = target.param.removesuffix(".weight")
                for member_tensors, (_, row, sign) in zip(tensors, members, strict=True):
                    member_tensors[name] = (a_rows[row], b_rows[row] if sign > 0 else b_neg[row])
            for (path, _, _), member_tensors in zip(members, tensors, strict=True):
                out[path] = member_tensors
                # One noise epoch is cached: its adapters are rebuilt from here after a merge
                # drops vLLM's copies (noise reuse), and the next epoch replaces it.
                seed, epoch = parse_member_path(path)[:2]
                if self._es_cache_epoch != (seed, epoch):
                    self._es_cache, self._es_cache_epoch = {}, (seed, epoch)
                self._es_cache[path] = member_tensors
        return out

    def _es_draw(self, rank: int, draws: list[tuple[int, int, int, float]]) -> torch.Tensor:
        """Every (seed, epoch, draw, sigma)'s Z for every target, one row per draw: (draws, sum of (m + n) r).

        A row holds the targets' Z (m + n, r) one after another (`_es_offsets`), B's m rows first.
        """
        targets = self._es_targets
        shapes = [(t.out_features, t.in_features) for t in targets]
        keys = [NoiseKey(seed, epoch, draw, t.layer, t.module) for seed, epoch, draw, _ in draws for t in targets]
        per_draw = sum((m + n) * rank for m, n in shapes)
        # One block, reused by every generation's draw (it is only read while members are laid out or
        # written into slots): faulting in fresh pages for it each time cost more than the draw at rank 4.
        need = per_draw * len(draws)
        if self._es_draw_buffer is None or self._es_draw_buffer.numel() < need:
            self._es_draw_buffer = None  # the old one goes before the new one is allocated
            self._es_draw_buffer = torch.empty(need, dtype=torch.float32)
        block = draw_block(keys, shapes * len(draws), rank, out=self._es_draw_buffer)
        block = block.view(len(draws), per_draw)
        # What the buffer now holds, for the merge (es_drawn); the next draw overwrites both.
        self._es_drawn = (rank, {key: row for row, key in enumerate(draws)}, block)
        return block

    def _es_load_adapter(self, request):
        manager = self.model_runner.lora_manager
        self._es_loaded_path.pop(request.lora_int_id, None)
        if not request.lora_path.startswith(SCHEME):
            return manager._es_original_load(request)
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.lora_weights import LoRALayerWeights

        factors = self._es_build([request.lora_path])[request.lora_path]
        self._es_loaded_path[request.lora_int_id] = request.lora_path  # what activating this id writes
        _, _, _, pop = parse_member_path(request.lora_path)
        helper = self._es_peft_helper(pop.rank)
        # Built directly rather than through LoRAModel.from_lora_tensors, which parses every tensor's
        # PEFT name back into the module name known here already. Not copied: the scaling is 1, so
        # vLLM neither rescales nor converts them (they are in its dtype); packing only lists them,
        # and activation copies them into the slots.
        loras = {
            module: LoRALayerWeights(module, helper.r, helper.lora_alpha, lora_a, lora_b)
            for module, (lora_a, lora_b) in factors.items()
        }
        return LoRAModel(request.lora_int_id, helper.r, loras)

    def _es_peft_helper(self, rank: int):
        """vLLM's view of a member's adapter config, validated once per rank."""
        from vllm.lora.peft_helper import PEFTHelper

        cached = self._es_helper
        if cached is not None and cached[0] == rank:
            return cached[1]
        manager = self.model_runner.lora_manager
        config = peft_config(rank, sorted({t.module for t in self._es_targets}))
        config["vllm_max_position_embeddings"] = manager.max_position_embeddings
        helper = PEFTHelper.from_dict(config)
        helper.validate_legal(manager.lora_config)
        if helper.lora_alpha / helper.r != 1 or helper.use_rslora:
            raise AssertionError("member adapters must have LoRA scaling 1: the cached factors are shared with vLLM")
        self._es_helper = (rank, helper)
        return helper

    def es_prepare(self, adapters: list[tuple[str, int]]) -> int:
        """Puts a batch's member adapters into vLLM's slots before its `generate`; returns how many were new.

        An adapter id not in a slot goes through vLLM (drawn with the others first, in one pass by
        `_es_build`, then registered and activated). An id in a slot that holds another member, as when
        the engine gives each generation's members the ids the last one had (vllm_engine), is written
        in place from its draw (`_es_write_members`): no per-member tensors, no registration. Adapters
        already resident are touched first so loading the new ones cannot evict them. Addresses that
        are not `es://` (the benchmark's PEFT files) are left to vLLM's own loading in the generate.
        """
        from vllm.lora.request import LoRARequest

        manager = self.model_runner.lora_manager
        slots = manager._adapter_manager
        members = [(path, i) for path, i in dict(adapters).items() if path.startswith(SCHEME)]
        if len(members) > slots.lora_slots:
            for path, i in members:  # vLLM activates from its registry: an id registered with another member goes
                if i in slots._registered_adapters and self._es_loaded_path.get(i) != path:
                    manager.remove_adapter(i)
            self._es_build([path for path, i in members if i not in slots._registered_adapters])
            self._es_claim_pairs([])
            return 0  # more members than slots: vLLM activates them batch by batch as it schedules them
        missing = [(p, i) for p, i in members if i not in slots._active_adapters]
        if missing:
            self._es_build([path for path, i in missing if i not in slots._registered_adapters])
            resident = [(p, i) for p, i in members if i in slots._active_adapters]
            with _slot_writes_queued(slots):
                for path, i in resident + missing:
                    manager.add_adapter(LoRARequest(lora_name=path, lora_int_id=i, lora_path=path))
        stale = [(p, i) for p, i in members if self._es_slot_path.get(i) != p]
        if stale:
            self._es_write_members(stale)
        self._es_slot_counts["loaded_by_vllm"] += len(missing)
        self._es_claim_pairs(members)
        return len(missing)

    def _es_watch_activation(self) -> None:
        """Records, whenever vLLM activates an adapter into a slot, that the slot holds its registered member.

        vLLM activates from the adapter it registered under that id, which for an id the engine reused
        is the member it was first loaded with, not the last one written in place. Patched on the
        instance; idempotent.
        """
        slots = self.model_runner.lora_manager._adapter_manager
        if getattr(slots, "_es_activation_watched", False):
            return
        activate = slots.activate_adapter

        def activate_adapter(lora_id: int) -> bool:
            if lora_id in slots._active_adapters:  # already in its slot: vLLM only touches its LRU entry
                return activate(lora_id)
            self._es_slot_path.pop(lora_id, None)
            done = activate(lora_id)
            if lora_id in slots._active_adapters and lora_id in self._es_loaded_path:
                self._es_slot_path[lora_id] = self._es_loaded_path[lora_id]
            return done

        slots.activate_adapter = activate_adapter
        slots._es_activation_watched = True

    def _es_write_members(self, members: list[tuple[str, int]]) -> None:
        """Writes members into the slots their (active) ids hold, straight from one draw.

        Drawn per rank in one pass as `_es_build` draws, and written by the kernel library's
        es_write_drawn_slots: scaled, rounded to the slots' dtype and transposed on the way, the bits
        `_es_build` and vLLM's activation would put there. Where that cannot run (slots not plain CPU
        tensors, no compiled library, a layer laid out otherwise), each id is reloaded through vLLM.
        """
        slots = self.model_runner.lora_manager._adapter_manager
        by_rank: dict[int, dict[tuple[int, int, int, float], list[tuple[str, int, int]]]] = {}
        for path, i in members:
            seed, epoch, member, pop = parse_member_path(path)
            key = (seed, epoch, pop.draw_of(member), pop.sigma)
            by_rank.setdefault(pop.rank, {}).setdefault(key, []).append((path, i, pop.sign_of(member)))
        for rank, by_draw in by_rank.items():
            jobs = self._es_jobs(rank)
            if jobs is None:
                reload = [(path, i) for group in by_draw.values() for path, i, _ in group]
                self._es_reload(reload)
                self._es_slot_counts["reloaded_by_vllm"] += len(reload)
                continue
            table, written = jobs
            block = self._es_draw(rank, list(by_draw))
            row_bytes = block.stride(0) * block.element_size()
            slot_of, at, ca, cb, done = [], [], [], [], []
            for row, (key, group) in enumerate(by_draw.items()):
                for path, i, sign in group:
                    slot_of.append(slots.lora_index_to_id.index(i))
                    at.append(block.data_ptr() + row * row_bytes)
                    ca.append(math.sqrt(key[3]))
                    cb.append(sign * math.sqrt(key[3] / rank))  # float32 then, as _es_build's coefficients
                    done.append((path, i))
            index = torch.tensor(slot_of, dtype=torch.int64)
            rows_at = torch.tensor(at, dtype=torch.int64)
            coeff_a = torch.tensor(ca, dtype=torch.float32)
            coeff_b = torch.tensor(cb, dtype=torch.float32)
            from .member_kernel import DTYPES, load, worker_threads

            lib = load()
            lib.es_write_drawn_slots(
                table.data_ptr(), table.shape[0], DTYPES[written[0].dtype][0], index.data_ptr(), rows_at.data_ptr(),
                coeff_a.data_ptr(), coeff_b.data_ptr(), len(done), worker_threads(),
            )  # fmt: skip
            for stacked in written:  # as _write_slots_native: the kernel's layer plans watch the counters
                torch.autograd.graph.increment_version(stacked)
            for path, i in done:
                self._es_slot_path[i] = path
            self._es_slot_counts["written_in_place"] += len(done)

    def _es_jobs(self, rank: int):
        """es_write_drawn_slots' jobs for members of this rank: (int64 table, stacked tensors it writes), or
        None where the slots are not laid out as this engine's CPU layers lay them (then vLLM reloads)."""
        cached = self._es_slot_jobs
        if cached is not None and cached[0] == rank:
            return cached[1]
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        from .member_kernel import DTYPES, load

        jobs = None if load() is None else self._es_plan_jobs(rank, BaseLinearLayerWithLoRA, DTYPES)
        self._es_slot_jobs = (rank, jobs)
        return jobs

    def _es_plan_jobs(self, rank: int, linear_type, dtypes):
        slots = self.model_runner.lora_manager._adapter_manager
        by_name = {t.param.removesuffix(".weight"): t for t in self._es_targets}
        rows, written, found = [], [], set()
        for name, module in slots.modules.items():
            if not isinstance(module, linear_type):
                continue
            if getattr(module, "tp_size", 1) != 1:
                return None
            parts = slots.packed_modules.get(name, [name])
            if len(parts) != module.n_slices:
                return None
            for k, part in enumerate(parts):
                t = by_name.get(part)
                if t is None:
                    continue  # untrained: vLLM zeroed it when the id was activated, and nothing writes it since
                a, b = module.lora_a_stacked[k], module.lora_b_stacked[k]
                m, n, off = t.out_features, t.in_features, self._es_offsets[t.param] * rank
                ok = (
                    a.device.type == b.device.type == "cpu"
                    and a.dtype == b.dtype
                    and a.dtype in dtypes
                    and a.is_contiguous()
                    and b.is_contiguous()
                    and a.dim() == b.dim() == 4
                    and a.shape[1] == b.shape[1] == 1
                    and a.shape[2] >= rank
                    and a.shape[3] == n
                    and b.shape[2] == m
                    and b.shape[3] >= rank
                )
                if not ok:
                    return None
                # A (r, n) is Z's last n rows transposed; B (m, r) its first m rows (see _es_draw).
                rows.append([a.data_ptr(), a.shape[2], n, rank, n, 1, rank, off + m * rank, 0])
                rows.append([b.data_ptr(), m, b.shape[3], m, rank, rank, 1, off, 1])
                written += [a, b]
                found.add(t.param)
        if found != {t.param for t in self._es_targets} or len({t.dtype for t in written}) != 1:
            return None
        return torch.tensor(rows, dtype=torch.int64), written

    def _es_reload(self, members: list[tuple[str, int]]) -> None:
        """Members into their ids' slots through vLLM: each id removed, then loaded and activated anew."""
        from vllm.lora.request import LoRARequest

        manager = self.model_runner.lora_manager
        self._es_build([path for path, _ in members])
        with _slot_writes_queued(manager._adapter_manager):
            for path, i in members:
                manager.remove_adapter(i)
                manager.add_adapter(LoRARequest(lora_name=path, lora_int_id=i, lora_path=path))

    def _es_claim_pairs(self, members: list[tuple[str, int]]) -> None:
        """Tells the member kernel which slots now hold both members of an antithetic pair.

        Called right after `es_prepare` wrote the slots: each pair's members came from one draw of
        `_es_build` (A the same tensor, B negated for the minus member), so the slots hold exactly
        that, and the kernel can read the pair's rows once. The claim records the layers' version
        counters now; a layer written after this (vLLM loading any other adapter) stops using it.
        """
        if not self._es_kernel:
            return
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        from .member_kernel import PairClaim, layer_versions, set_claim

        manager = self.model_runner.lora_manager._adapter_manager
        modules = [m for m in manager.modules.values() if isinstance(m, BaseLinearLayerWithLoRA)]
        claim = None
        if members and modules:
            by_id = {i: path for path, i in members}
            draws: dict[tuple, dict[int, int]] = {}
            for slot, adapter in enumerate(manager.lora_index_to_id):
                path = by_id.get(adapter)
                if path is not None:
                    seed, epoch, member, pop = parse_member_path(path)
                    key = (seed, epoch, pop.draw_of(member), pop.sigma, pop.rank)
                    draws.setdefault(key, {})[pop.sign_of(member)] = slot
            canon = torch.arange(modules[0].lora_a_stacked[0].shape[0])
            for signs in draws.values():
                if len(signs) == 2 and 1 in signs and -1 in signs:
                    canon[signs[-1]] = signs[1]
            versions = {id(m.lora_a_stacked): layer_versions(m.lora_a_stacked, m.lora_b_stacked) for m in modules}
            claim = PairClaim(canon, versions)
        for wrapper in manager.punica_wrapper_mapping.values():
            set_claim(wrapper, claim)

    def es_apply_update(
        self,
        seed: int,
        epoch: int,
        pop: dict,
        shaped: list[float],
        lr: float,
        scaling: str,
        optimizer: dict | None = None,
    ) -> None:
        # No checksum here: hashing every master (hundreds of MB) took a sizeable share of a step's
        # non-generation time, and it is only needed when replicas compare (es_checksum, on request).
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
            drawn=self._es_held_factors(seed, epoch, population),
        )
        self._es_push()

    def _es_held_factors(self, seed: int, epoch: int, pop: Population):
        """The merge's noise from the block the members were built from, if it still holds this step's
        draws (it does unless something was drawn since): the same numbers stacked_factors would draw,
        read instead of drawn again. Both use the current noise version (neither is given another)."""
        if self._es_drawn is None:
            return None
        rank, rows, block = self._es_drawn
        if rank != pop.rank:
            return None

        looked_up: dict[tuple[int, ...], tuple[list | None, slice | None]] = {}

        def rows_of(draws):
            """The block's rows of these draws (None if it lacks one), and them as a slice when consecutive;
            worked out once per merge, not per matrix."""
            key = tuple(draws)
            if key not in looked_up:
                index = [rows.get((seed, epoch, k, pop.sigma)) for k in draws]
                if any(i is None for i in index):
                    looked_up[key] = (None, None)
                else:
                    first = index[0]
                    run = index == list(range(first, first + len(index)))
                    looked_up[key] = (index, slice(first, first + len(index)) if run else None)
            return looked_up[key]

        def held(target, draws):
            index, run = rows_of(draws)
            if index is None:
                return None
            m, n, r = target.out_features, target.in_features, rank
            start = self._es_offsets[target.param] * r
            # The usual case (a population's draws are the block's first rows): a view, not a gathered copy.
            z = block[run if run is not None else index, start : start + (m + n) * r]
            z = z.view(len(index), m + n, r)
            return z[:, :m], z[:, m:]

        return held

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
        from . import member_gemm
        from .member_kernel import report

        out = report(self.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values())
        out.update(member_gemm.report(getattr(self, "_es_gemm", [])))
        out["slot_members"] = dict(getattr(self, "_es_slot_counts", {}))
        return out

    def es_use_kernel(self, kernel: str) -> str:
        """Switches this engine between the member kernel ("es") and vLLM's own LoRA ops ("vllm").

        "es" also puts the fused AMX GEMM back on the trained layers where it was installed, "vllm"
        gives them vLLM's GEMM: the benchmark's stock baseline is vLLM as it ships.
        """
        from . import member_gemm
        from .member_kernel import install, uninstall

        wrappers = self.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values()
        if kernel == "es":
            self._es_kernel = all([install(w) for w in wrappers])
            if self._es_kernel and getattr(self, "_es_gemm", []):
                member_gemm.reinstate(self._es_gemm)
            elif self._es_kernel:
                self._es_install_gemm()  # an engine started on vLLM's ops gets it here
        elif kernel == "vllm":
            member_gemm.restore(getattr(self, "_es_gemm", []))
            for w in wrappers:
                uninstall(w)
            self._es_kernel = False
        else:
            raise ValueError(f"kernel must be 'es' or 'vllm', got {kernel!r}")
        return self.es_kernel()

    def es_memory(self) -> dict:
        """Bytes held for members (the seed-built factors cached for this epoch, vLLM's slots), the optimizer's
        state, and the fused GEMM's packed copy of the trained weights (0 when it is not installed)."""
        # Members share storage (a pair's A side is one tensor), so count each storage once.
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for factors in self._es_cache.values()
            for pair in factors.values()
            for t in pair
        }
        cache = sum(storages.values())
        slots = 0
        for module in self.model_runner.model.modules():
            for name in ("lora_a_stacked", "lora_b_stacked"):
                stacked = getattr(module, name, None)
                for t in [stacked] if isinstance(stacked, torch.Tensor) else stacked or ():
                    slots += t.numel() * t.element_size()
        optim = self._es_optim.nbytes() if self._es_optim is not None else 0
        from .member_gemm import report

        packed = report(getattr(self, "_es_gemm", []))["gemm_packed_bytes"]
        return {
            "gemm_packed_bytes": packed,
            "member_cache_bytes": cache,
            "members_cached": len(self._es_cache),
            "lora_slot_bytes": slots,
            "optimizer_state_bytes": optim,
        }

    def es_weight_push(self) -> str:
        """How merged masters reach the model: "direct" (repacked on CPU) or "reload" (vLLM's reload)."""
        if not hasattr(self, "_es_direct"):
            self._es_direct = self._es_direct_plan()
        return "reload" if self._es_direct is None else "direct"

    def es_checksum(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self._es_master):
            digest.update(name.encode())
            digest.update(self._es_master[name].numpy().tobytes())
        return digest.hexdigest()

    def _es_push(self) -> None:
        """Puts the merged masters into the model: repacked directly on CPU, else vLLM's layerwise reload."""
        if self.es_weight_push() == "reload":
            self.reload_weights(weights_iterator=iter(list(self._es_master.items())), is_checkpoint_format=True)
            return
        # What vLLM's reload ends in for an unquantized CPU linear layer (its weights cast to the model
        # dtype, then its GEMM kernel rebuilt), without the layerwise machinery around it: meta
        # tensors, per-shard loaders and a copy back per layer. LoRA slots do not depend on the base
        # weights, so resident members stay (vLLM's reload drops them all).
        from .member_gemm import pack_only, repack

        fused = {id(f.base): f for f in getattr(self, "_es_gemm", [])}
        active = self._es_kernel
        for layer, shards in self._es_direct:
            f = fused.get(id(layer))
            if f is not None and pack_only(
                f, [self._es_master[name] for name in shards], functools.partial(self._es_rebuild_gemm, layer, shards)
            ):
                continue
            weight = self._es_layer_weight(layer, shards)
            self._es_set_gemm(layer, weight)
            if f is not None:
                repack(f, weight, active)

    def _es_set_gemm(self, layer, weight: torch.Tensor):
        """vLLM's GEMM for a layer, built on `weight` as its reload would; returns it."""
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        return layer.cpu_linear

    def _es_rebuild_gemm(self, layer, shards):
        """vLLM's GEMM for a layer the fused GEMM serves, on the current masters (see member_gemm.pack_only)."""
        return self._es_set_gemm(layer, self._es_layer_weight(layer, shards))

    def _es_layer_weight(self, layer, shards) -> torch.Tensor:
        """A layer's weights in the model dtype, built from its shards' masters."""
        parts = [self._es_master[name] for name in shards]
        # Shards converted straight into one tensor of the model dtype (no float32 concatenation
        # first); a copy even in float32, as the masters keep changing in place.
        weight = torch.empty(layer.output_size_per_partition, parts[0].shape[1], dtype=layer.params_dtype)
        row = 0
        for part in parts:
            weight[row : row + part.shape[0]].copy_(part)
            row += part.shape[0]
        return weight

    def _es_direct_plan(self) -> list | None:
        """(vLLM linear layer, its checkpoint shards in row order) for every touched layer, or None.

        Only where repacking by hand is exactly what vLLM's reload would do: CPU, one tensor-parallel
        rank, unquantized layers found under the checkpoint's names with the shapes the shards add up to.
        """
        from vllm.lora.layers import BaseLayerWithLoRA
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        model = self.model_runner.get_model()
        plan, seen = [], set()
        for t in self._es_targets:
            prefix = t.param.rsplit(".", 2)[0]
            fused = FUSED.get(t.module)
            name = f"{prefix}.{fused}_proj" if fused else f"{prefix}.{t.module}"
            if name in seen:
                continue
            seen.add(name)
            shards = [f"{prefix}.{shard}.weight" for shard in SHARDS[fused]] if fused else [t.param]
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                return None
            if isinstance(layer, BaseLayerWithLoRA):
                layer = layer.base_layer
            if (
                not isinstance(getattr(layer, "quant_method", None), UnquantizedLinearMethod)
                or getattr(layer, "tp_size", 1) != 1
                or not hasattr(layer, "cpu_linear")
                or any(shard not in self._es_master for shard in shards)
            ):
                return None
            rows = sum(self._es_master[shard].shape[0] for shard in shards)
            cols = {self._es_master[shard].shape[1] for shard in shards}
            if (rows, cols) != (layer.output_size_per_partition, {layer.input_size_per_partition}):
                return None
            plan.append((layer, shards))
        return plan


def worker_extension_name() -> str:
    return f"{ESWorkerExtension.__module__}.{ESWorkerExtension.__qualname__}"
