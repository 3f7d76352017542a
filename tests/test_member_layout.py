"""The worker lays many members out at once (and writes vLLM's slots in bulk): the same tensors and slots
as building each member alone with adapters.member_lora and vLLM's own set_lora."""

from types import SimpleNamespace

import pytest
import torch

from adapters import Population, Target, member_lora
from es_serve.engines import member_kernel, vllm_worker
from es_serve.engines.vllm_worker import (
    ESWorkerExtension,
    _queue_slot_writes,
    _write_queued_slots,
    member_path,
    parse_member_path,
)

TARGETS = [
    Target(0, "q_proj", 48, 32, "model.layers.0.self_attn.q_proj.weight"),
    Target(0, "down_proj", 32, 80, "model.layers.0.mlp.down_proj.weight"),
    Target(1, "q_proj", 48, 32, "model.layers.1.self_attn.q_proj.weight"),
]


class Worker(ESWorkerExtension):
    """The worker extension without vLLM around it: its own state, a fake LoRA manager, fake layers."""

    def _es_jobs(self, rank):
        return self._es_plan_jobs(rank, FakeLayer, member_kernel.DTYPES)


def _worker(dtype, slots=None):
    worker = Worker()
    worker.__dict__.update(_es_cache={}, _es_cache_epoch=None, _es_targets=TARGETS, _es_draw_buffer=None)
    worker.__dict__.update(_es_drawn=None, _es_slot_path={}, _es_loaded_path={})
    worker._es_slot_counts = {"loaded_by_vllm": 0, "written_in_place": 0, "reloaded_by_vllm": 0}
    worker._es_offsets, offset = {}, 0
    for t in TARGETS:
        worker._es_offsets[t.param] = offset
        offset += t.out_features + t.in_features
    manager = SimpleNamespace(lora_config=SimpleNamespace(lora_dtype=dtype), _adapter_manager=slots)
    worker.model_runner = SimpleNamespace(lora_manager=manager)
    return worker


def _torch_only(monkeypatch, native):
    """Takes the torch path where the worker would call the member kernel's library (native=False)."""
    if native:
        if member_kernel.load() is None:
            pytest.skip(f"member kernel library not built: {member_kernel.load_error()}")
        return
    monkeypatch.setattr(vllm_worker, "_write_slots_native", lambda *args: False)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"]
)
@pytest.mark.parametrize("rank", [1, 3])
def test_population_layout_equals_each_member_built_alone(dtype, rank):
    pop = Population(size=6, rank=rank, sigma=0.02)
    worker = _worker(dtype)
    # Members out of order, one pair incomplete, and a second population in the same call.
    other = Population(size=4, rank=rank, sigma=0.5)
    paths = [member_path(5, 2, i, pop) for i in (3, 0, 1, 4)] + [member_path(5, 2, 1, other)]
    built = ESWorkerExtension._es_build(worker, paths)
    for path in paths:
        _, _, member, p = parse_member_path(path)
        for t in TARGETS:
            lora_a, lora_b = member_lora(p, member, t, 5, 2)
            got_a, got_b = built[path][t.param.removesuffix(".weight")]
            assert got_a.dtype == got_b.dtype == dtype
            assert got_a.shape == (rank, t.in_features) and got_b.shape == (t.out_features, rank)
            assert got_a.is_contiguous() and got_b.is_contiguous()
            # Bit for bit: the same float32 products, rounded once to the LoRA dtype.
            assert torch.equal(got_a, lora_a.to(dtype)), (path, t.param)
            assert torch.equal(got_b, lora_b.to(dtype)), (path, t.param)
    assert set(worker._es_cache) == set(paths)  # one epoch, kept for rebuilding after a merge
    # The next generation's draw reuses the worker's draw buffer: what this one cached is untouched.
    snapshot = {p: {k: (a.clone(), b.clone()) for k, (a, b) in built[p].items()} for p in paths}
    ESWorkerExtension._es_build(worker, [member_path(5, 3, i, pop) for i in range(6)])
    for path in paths:
        for name, (a, b) in snapshot[path].items():
            assert torch.equal(built[path][name][0], a) and torch.equal(built[path][name][1], b)
    # Members 0 and 1 are one antithetic pair: one copy of A's side between them, B's negated.
    for t in TARGETS:
        name = t.param.removesuffix(".weight")
        (a0, b0), (a1, b1) = built[paths[1]][name], built[paths[2]][name]
        assert a0.data_ptr() == a1.data_ptr() and b0.data_ptr() != b1.data_ptr()
        assert torch.equal(b1, -b0)


class FakeLayer:
    """vLLM's linear LoRA layer as far as slots go: stacked tensors, reset_lora and set_lora (tp = 1)."""

    def __init__(self, widths, width_in, slots, slot_rank):
        self.n_slices, self.tp_size = len(widths), 1
        self.lora_a_stacked = tuple(torch.zeros(slots, 1, slot_rank, width_in) for _ in widths)
        self.lora_b_stacked = tuple(torch.zeros(slots, 1, w, slot_rank) for w in widths)
        self.writes = 0

    def reset_lora(self, index):
        for k in range(self.n_slices):
            self.lora_a_stacked[k][index] = 0
            self.lora_b_stacked[k][index] = 0

    def set_lora(self, index, lora_a, lora_b):
        self.writes += 1
        self.reset_lora(index)
        lora_a = lora_a if isinstance(lora_a, list) else [lora_a]
        lora_b = lora_b if isinstance(lora_b, list) else [lora_b]
        for k in range(self.n_slices):
            self.lora_a_stacked[k][index, 0, : lora_a[k].shape[0], : lora_a[k].shape[1]].copy_(lora_a[k])
            self.lora_b_stacked[k][index, 0, : lora_b[k].shape[0], : lora_b[k].shape[1]].copy_(lora_b[k])


@pytest.mark.parametrize("native", [True, False], ids=["library", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("slot_rank,rank", [(2, 2), (8, 1), (8, 2), (8, 4)])
def test_queued_slot_writes_equal_vllms_one_by_one(slot_rank, rank, dtype, native, monkeypatch):
    _torch_only(monkeypatch, native)
    widths, width_in, slots = (12, 4, 4), 10, 6
    g = torch.Generator().manual_seed(0)
    stock, ours = FakeLayer(widths, width_in, slots, slot_rank), FakeLayer(widths, width_in, slots, slot_rank)
    for layer in (stock, ours):  # slots holding something from before, with every padding row used
        layer.lora_a_stacked = tuple(t.to(dtype) for t in layer.lora_a_stacked)
        layer.lora_b_stacked = tuple(t.to(dtype) for t in layer.lora_b_stacked)
        for t in layer.lora_a_stacked + layer.lora_b_stacked:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
    _queue_slot_writes(ours)
    writes = {
        i: (
            [torch.randn(rank, width_in, generator=g).to(dtype) for _ in widths],
            [torch.randn(w, rank, generator=g).to(dtype) for w in widths],
        )
        for i in (4, 0, 2)
    }
    versions = [member_kernel.layer_versions(ours.lora_a_stacked, ours.lora_b_stacked)]
    for i, (a, b) in writes.items():
        stock.set_lora(i, a, b)
    ours._es_slot_queue = {}
    for i, (a, b) in writes.items():
        ours.set_lora(i, a, b)
    assert ours.writes == 0  # queued, not written one by one
    _write_queued_slots(ours)
    # Every slot tensor counts as written: the member kernel's plans re-read a layer when these move.
    versions.append(member_kernel.layer_versions(ours.lora_a_stacked, ours.lora_b_stacked))
    assert all(after > before for before, after in zip(*versions, strict=True))
    for got, want in zip(
        ours.lora_a_stacked + ours.lora_b_stacked, stock.lora_a_stacked + stock.lora_b_stacked, strict=True
    ):
        assert torch.equal(got, want)
    # Outside es_prepare nothing is queued: vLLM's own write runs at once.
    ours.set_lora(1, *writes[4])
    stock.set_lora(1, *writes[4])
    assert ours.writes == 1
    for got, want in zip(
        ours.lora_a_stacked + ours.lora_b_stacked, stock.lora_a_stacked + stock.lora_b_stacked, strict=True
    ):
        assert torch.equal(got, want)


def test_queued_writes_of_mixed_ranks_fall_back_to_vllms_writes():
    stock, ours = FakeLayer((6,), 5, 4, 4), FakeLayer((6,), 5, 4, 4)
    _queue_slot_writes(ours)
    writes = {0: (torch.ones(1, 5), torch.ones(6, 1)), 3: (torch.full((3, 5), 2.0), torch.full((6, 3), 3.0))}
    ours._es_slot_queue = {}
    for i, (a, b) in writes.items():
        stock.set_lora(i, a, b)
        ours.set_lora(i, a, b)
    _write_queued_slots(ours)
    assert ours.writes == 2
    for got, want in zip(
        ours.lora_a_stacked + ours.lora_b_stacked, stock.lora_a_stacked + stock.lora_b_stacked, strict=True
    ):
        assert torch.equal(got, want)


def test_merge_reads_the_noise_the_members_were_built_from():
    """The merge's factors come from the block drawn for the members when it holds them: bit for bit what
    stacked_factors draws afresh, and nothing for a step whose draws the block does not hold."""
    from adapters import stacked_factors

    pop = Population(size=6, rank=2, sigma=0.02)
    worker = _worker(torch.bfloat16)
    ESWorkerExtension._es_build(worker, [member_path(5, 2, i, pop) for i in (4, 0, 1, 5)])  # draws 2 and 0
    held = ESWorkerExtension._es_held_factors(worker, 5, 2, pop)
    for t in TARGETS:
        for draws in ([0, 2], [2], [2, 0]):
            a, b = held(t, draws)
            ref_a, ref_b = stacked_factors(5, 2, draws, t.layer, t.module, t.out_features, t.in_features, 2)
            assert torch.equal(a, ref_a) and torch.equal(b, ref_b), (t.param, draws)
        assert held(t, [0, 1]) is None  # draw 1 (members 2 and 3) was never drawn here
    assert ESWorkerExtension._es_held_factors(worker, 5, 3, pop)(TARGETS[0], [0]) is None  # another epoch
    assert ESWorkerExtension._es_held_factors(worker, 5, 2, Population(size=6, rank=1, sigma=0.02)) is None
    other_sigma = ESWorkerExtension._es_held_factors(worker, 5, 2, Population(size=6, rank=2, sigma=0.03))
    assert other_sigma(TARGETS[0], [0]) is None


def _fake_slots(dtype, slot_rank, n_slots=6):
    """vLLM's LoRA manager as far as _es_write_members reads it: SmolLM-like packed q/k/v (k and v untrained
    here) and a down projection, every slot holding something from before."""
    g = torch.Generator().manual_seed(3)
    layers = {
        "model.layers.0.self_attn.qkv_proj": FakeLayer((48, 16, 16), 32, n_slots, slot_rank),
        "model.layers.0.mlp.down_proj": FakeLayer((32,), 80, n_slots, slot_rank),
        "model.layers.1.self_attn.qkv_proj": FakeLayer((48, 16, 16), 32, n_slots, slot_rank),
    }
    for layer in layers.values():
        layer.lora_a_stacked = tuple(torch.randn(t.shape, generator=g).to(dtype) for t in layer.lora_a_stacked)
        layer.lora_b_stacked = tuple(torch.randn(t.shape, generator=g).to(dtype) for t in layer.lora_b_stacked)
    packed = {
        name: [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        for name in layers
        if name.endswith("qkv_proj")
    }
    return SimpleNamespace(modules=layers, packed_modules=packed, lora_index_to_id=[None, 9, 4, 12, None, 30])


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"]
)
@pytest.mark.parametrize("slot_rank,rank", [(2, 2), (4, 1), (4, 3)])
def test_members_written_in_place_equal_each_member_built_alone(dtype, slot_rank, rank):
    if member_kernel.load() is None:
        pytest.skip(f"member kernel library not built: {member_kernel.load_error()}")
    slots = _fake_slots(dtype, slot_rank)
    worker = _worker(dtype, slots)
    before = {
        name: [t.clone() for t in layer.lora_a_stacked + layer.lora_b_stacked] for name, layer in slots.modules.items()
    }
    versions = [member_kernel.layer_versions(x.lora_a_stacked, x.lora_b_stacked) for x in slots.modules.values()]
    pop, other = Population(size=6, rank=rank, sigma=0.02), Population(size=4, rank=rank, sigma=0.5)
    # Ids to their slots out of order, an antithetic pair (members 0 and 1), another population's member.
    members = [(member_path(5, 2, 1, pop), 12), (member_path(5, 2, 0, pop), 9), (member_path(5, 2, 4, pop), 30)]
    members.append((member_path(5, 2, 3, other), 4))
    worker._es_write_members(members)
    written = {slots.lora_index_to_id.index(i): path for path, i in members}
    for name, layer in slots.modules.items():
        parts = slots.packed_modules.get(name, [name])
        for k, part in enumerate(parts):
            target = next((t for t in TARGETS if t.param == part + ".weight"), None)
            got_a, got_b = layer.lora_a_stacked[k][:, 0], layer.lora_b_stacked[k][:, 0]
            old_a, old_b = before[name][k][:, 0], before[name][len(parts) + k][:, 0]
            for slot in range(len(slots.lora_index_to_id)):
                if target is None or slot not in written:  # untrained slices and other slots: untouched
                    assert torch.equal(got_a[slot], old_a[slot]) and torch.equal(got_b[slot], old_b[slot])
                    continue
                _, _, member, p = parse_member_path(written[slot])
                lora_a, lora_b = member_lora(p, member, target, 5, 2)
                want_a = torch.zeros(slot_rank, target.in_features, dtype=dtype)
                want_b = torch.zeros(target.out_features, slot_rank, dtype=dtype)
                want_a[:rank] = lora_a.to(dtype)
                want_b[:, :rank] = lora_b.to(dtype)
                # Bit for bit what building the member alone and vLLM's reset then set_lora leave in the slot.
                assert torch.equal(got_a[slot], want_a), (name, k, slot)
                assert torch.equal(got_b[slot], want_b), (name, k, slot)
    after = [member_kernel.layer_versions(x.lora_a_stacked, x.lora_b_stacked) for x in slots.modules.values()]
    assert all(a > b for old, new in zip(versions, after, strict=True) for b, a in zip(old, new, strict=True) if a != b)
    assert any(a != b for old, new in zip(versions, after, strict=True) for b, a in zip(old, new, strict=True))
    assert worker._es_slot_path == {i: path for path, i in members}
    assert worker._es_slot_counts == {"loaded_by_vllm": 0, "written_in_place": 4, "reloaded_by_vllm": 0}
    # The merge reads this step's noise from the block the members were written from.
    held = ESWorkerExtension._es_held_factors(worker, 5, 2, pop)
    assert held(TARGETS[0], [0, 2]) is not None


def test_members_whose_slots_are_laid_out_otherwise_are_reloaded_through_vllm():
    slots = _fake_slots(torch.float32, 2)
    slots.modules["model.layers.0.mlp.down_proj"].lora_b_stacked = (torch.zeros(6, 1, 32, 2, dtype=torch.bfloat16),)
    worker = _worker(torch.float32, slots)
    calls = []
    worker.model_runner.lora_manager.remove_adapter = lambda i: calls.append(("remove", i))
    worker.model_runner.lora_manager.add_adapter = lambda request: calls.append(("add", request.lora_int_id))
    pop = Population(size=6, rank=2, sigma=0.02)
    worker._es_write_members([(member_path(5, 2, 1, pop), 12), (member_path(5, 2, 0, pop), 9)])
    assert calls == [("remove", 12), ("add", 12), ("remove", 9), ("add", 9)]
    assert worker._es_slot_counts["reloaded_by_vllm"] == 2 and worker._es_slot_counts["written_in_place"] == 0


def test_an_id_vllm_activates_again_holds_the_member_it_was_registered_with_until_written():
    class Slots:  # vLLM's LoRAModelManager.activate_adapter as far as the record goes
        def __init__(self):
            self._active_adapters = {}

        def activate_adapter(self, lora_id):
            if lora_id in self._active_adapters:
                return False
            self._active_adapters[lora_id] = None
            return True

    slots = Slots()
    worker = _worker(torch.float32, slots)
    worker._es_watch_activation()
    worker._es_watch_activation()  # idempotent
    worker._es_loaded_path[5] = "es://registered"
    assert slots.activate_adapter(5) is True and worker._es_slot_path == {5: "es://registered"}
    worker._es_slot_path[5] = "es://written-in-place"
    assert slots.activate_adapter(5) is False  # already in its slot: nothing rewritten, the record stands
    assert worker._es_slot_path == {5: "es://written-in-place"}
    del slots._active_adapters[5]  # evicted; activating it again writes what vLLM registered
    slots.activate_adapter(5)
    assert worker._es_slot_path == {5: "es://registered"}
    slots.activate_adapter(6)  # an adapter this worker did not load (a PEFT file): nothing is known of its slot
    assert 6 not in worker._es_slot_path
