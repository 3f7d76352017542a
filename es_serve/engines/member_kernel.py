"""A LoRA step specialised for ES members, swapped into vLLM's CPU LoRA path.

Every token of an ES batch belongs to exactly one low-rank member, so the LoRA term of a layer is,
per token, r dot products with the member's A rows and r scaled copies of its B columns. vLLM's
CPU ops instead gather each token's whole A and B into new tensors and run batched einsums; at rank
1 those copies and per-call costs, not the arithmetic, took a fifth of decode time. The kernel in
kernels/member_lora.c reads the rows in place and writes into the layer output directly, in
float32, bfloat16 or float16 (sums in float32; native bf16 dot products where the CPU has them),
over torch's OpenMP threads when the batch is large enough to pay for waking them.

Per engine step, the batch's tokens are grouped by slot once (StepGroups) and every layer of the step
reuses that grouping; per layer, only the activations are checked and one C call runs. The two
members of an antithetic pair share one group (PairClaim): their slots hold the same A and negated
B, so the pair's rows are read once for both.

It is compiled once per machine with the system C compiler (a plain shared library called through
ctypes, no torch headers, so it builds in about a second). Without a compiler, or for tensors it
does not handle, the pure-torch `member_lora_torch` does the same sum; every such call is counted
with its reason, and `report`/`describe` name the path that really ran.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import operator
import subprocess
import time
from pathlib import Path

import torch

from adapters.native import compile_library, compiler_version, find_compiler, kernel_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "member_lora.c"
GEMM_SOURCE = SOURCE.with_name("member_gemm.c")  # included by member_lora.c: one library
FLAGS = ["-O3", "-march=native", "-std=c11", "-shared", "-fPIC"]
# Tried in order: threaded, then serial for compilers without OpenMP (plain clang, for one).
VARIANTS = {"openmp": ["-fopenmp"], "serial": ["-fopenmp-simd"]}
MAX_RANK = 512
DTYPES = {torch.float32: (0, "f32"), torch.bfloat16: (1, "bf16"), torch.float16: (2, "f16")}
# Below this many multiply-adds per call one thread finishes before a team could be woken
# (measured by benchmarks/member_kernel.py: a fork-join costs a few microseconds).
PARALLEL_MIN_WORK = 1 << 16
# Highest member rank whose term the fused GEMM adds in its epilogue (es_gemm_lora's limit). Above it the
# fused GEMM runs plain and the kernel here adds the term after it, which is slower at every rank measured:
# the GEMM splits output columns over the threads and this kernel splits tokens, so half of what it reads
# was just written by the other core (benchmarks/member_gemm.py, one decode step of SmolLM2's trained
# layers at N = 32, rank 4: 10.7 ms on top of the plain GEMM this way, 8.4 ms in the epilogue).
FUSED_MAX_RANK = 16
_library: ctypes.CDLL | None = None
_load_error: str | None = None
_info: dict = {}


def cache_dir() -> Path:
    return kernel_cache_dir()


def _cpu_signature() -> str:
    # -march=native bakes in this CPU's instruction set: a library built on another CPU may not run.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def library_path(compiler: str, variant: str = "openmp") -> Path:
    parts = [
        SOURCE.read_text(),
        GEMM_SOURCE.read_text(),
        *FLAGS,
        *VARIANTS[variant],
        compiler_version(compiler),
        _cpu_signature(),
    ]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return cache_dir() / f"member_lora-{variant}-{key[:16]}.so"


def _compile(compiler: str, variant: str, extra: list[str]) -> Path:
    target = library_path(compiler, variant)
    if extra:
        target = target.with_name(target.stem + "-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8] + ".so")
    return compile_library(compiler, [*FLAGS, *VARIANTS[variant], *extra], SOURCE, target)


def build(compiler: str | None = None, extra: list[str] | None = None) -> Path:
    """Compiles the kernel into the cache (once; later calls find it) and returns its path.

    `extra` adds compiler flags (tests use it to build the portable paths on any CPU).
    """
    compiler = find_compiler(compiler)
    try:
        return _compile(compiler, "openmp", extra or [])
    except RuntimeError as exc:
        try:
            return _compile(compiler, "serial", extra or [])
        except RuntimeError:
            raise exc from None


def _openmp_runtimes() -> set[str]:
    """Files of OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)}


def open_library(path: Path) -> tuple[ctypes.CDLL, dict]:
    """Loads a built kernel and says what it can do: OpenMP threads, native bf16 instructions."""
    before = _openmp_runtimes()
    lib = ctypes.CDLL(str(path))
    added = _openmp_runtimes() - before
    fn = lib.es_member_lora
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    # kind, x, tokens, in, A[], A rows per slot, slots, B^T[], widths[], slices, rank, y, y row stride,
    # y offset, token slots, scale, threads
    fn.argtypes = [
        ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_float,
        ctypes.c_int,
    ]  # fmt: skip
    lib.es_member_group.restype = i64
    lib.es_member_group.argtypes = [ptr, i64, i64, ptr, ptr, ptr]  # slots, tokens, slots bound, canon, order, units
    lib.es_used_rank.restype = i64
    lib.es_used_rank.argtypes = [ptr, i64, i64, i64, i64, i64]  # A[], slices, slots, A rows per slot, in, bytes
    lib.es_transpose_b.restype = None
    # B[], B^T[], widths[], slices, slots, B columns per slot, rank, element bytes, threads
    lib.es_transpose_b.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.es_member_lora_units.restype = ctypes.c_int
    # layer, slots, canon, order, units, units count, x, y, y row stride, y offset, scale, threads
    lib.es_member_lora_units.argtypes = [
        ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    lib.es_member_lora_step.restype = ctypes.c_int
    lib.es_member_lora_step.argtypes = [ptr, ptr, ptr, ptr, i64, ctypes.c_float]  # layer, step, x, y, y stride, scale
    lib.es_write_slots.restype = None
    # stacked, slot rows, slot cols, slots[], sources[], count, rows, cols, element bytes, threads
    lib.es_write_slots.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.es_write_drawn_slots.restype = None
    # jobs (9 int64 each), jobs count, dtype code, slots[], draw row addresses[], A's and B's coefficients[],
    # members count, threads
    lib.es_write_drawn_slots.argtypes = [ptr, i64, ctypes.c_int, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    from .member_gemm import declare

    declare(lib)
    info = {
        "library": path.name,
        "openmp": bool(lib.es_member_lora_openmp()),
        "bf16_native": bool(lib.es_member_lora_bf16_native()),
        "threads_ok": True,
    }
    if info["openmp"] and before and added:
        # The library pulled in its own OpenMP runtime beside torch's: two thread pools would
        # fight over the same cores, so this process keeps the kernel on one thread.
        info["threads_ok"] = False
        info["threads_note"] = f"a second OpenMP runtime ({', '.join(sorted(added))}) next to torch's"
    return lib, info


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (the reason is logged once and kept in `load_error()`)."""
    global _library, _load_error, _info
    if _library is not None or _load_error is not None:
        return _library
    try:
        _library, _info = open_library(build())
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        _load_error = str(exc)
        log.warning("ES member kernel unavailable, using the torch fallback: %s", exc)
    return _library


def usable_threads(threads: int) -> int:
    """`threads`, or 1 when the library must stay serial (a second OpenMP runtime got loaded; open_library)."""
    return threads if _info.get("threads_ok", False) else 1


def worker_threads() -> int:
    """Threads for the library's per-generation writes: torch's, where the library may use them."""
    return usable_threads(torch.get_num_threads())


def load_error() -> str | None:
    return _load_error


def kernel_info() -> dict:
    """What the loaded kernel can do (empty when it did not load)."""
    load()
    return dict(_info)


def member_lora_torch(y, x, a_stacked, b_stacked, slots, output_slices, scale: float = 1.0) -> None:
    """Same sum as the C kernel in torch: y[t, slice] += B[s_t] (scale A[s_t] x_t) for s_t >= 0."""
    rows = (slots >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    s = slots.index_select(0, rows)
    xs = x.index_select(0, rows).float()
    offset = 0
    for a, b, width in zip(a_stacked, b_stacked, output_slices, strict=True):
        a_sel = a[:, 0].index_select(0, s).float()  # (t, rank, in)
        b_sel = b[:, 0].index_select(0, s).float()  # (t, out, rank)
        h = torch.bmm(a_sel, xs.unsqueeze(-1)) * scale  # (t, rank, 1)
        delta = torch.bmm(b_sel, h).squeeze(-1)[:, :width]
        y[rows, offset : offset + width] = (y[rows, offset : offset + width].float() + delta).to(y.dtype)
        offset += width


class KernelStats:
    """Calls served by the C kernel (per dtype) and by the torch fallback (per reason)."""

    def __init__(self):
        self.fast: dict[str, int] = {}
        self.fallback: dict[str, int] = {}
        self.threads = 1  # torch's compute threads in the engine
        self.team = 0  # most threads one kernel call really ran on
        self.seconds = 0.0  # wall time inside the C kernel: the LoRA term's own cost (benchmarks read it)
        self.paired = 0  # kernel calls that read each antithetic pair's rows once for both members
        self.plan_seconds = 0.0  # wall time re-reading layers after their slots were written (LayerPlan.refresh)
        self.fused = 0  # calls whose term the fused GEMM added in its epilogue (member_gemm.py)

    def add_fast(self, name: str) -> None:
        self.fast[name] = self.fast.get(name, 0) + 1

    def add_fallback(self, reason: str) -> None:
        self.fallback[reason] = self.fallback.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {
            "fast_calls": dict(self.fast),
            "fallback_calls": dict(self.fallback),
            "threads": self.threads,
            "kernel_threads_max": self.team,
            "kernel_seconds": self.seconds,
            "paired_calls": self.paired,
            "plan_seconds": self.plan_seconds,
            "fused_calls": self.fused,
        }


def describe(report: dict) -> str:
    """The path that really served members: "es-c-bf16", "es-torch-fallback", a mix, or "es-idle".

    A fallback is named as such even if it served one call among thousands of fast ones.
    """
    fast = sorted(report.get("fast_calls", {}))
    parts = [f"es-c-{'+'.join(fast)}"] if fast else []
    if report.get("fallback_calls"):
        parts.append("es-torch-fallback")
    return "+".join(parts) or "es-idle"


def merge_reports(reports) -> dict:
    out = {
        "fast_calls": {}, "fallback_calls": {}, "threads": 1, "kernel_threads_max": 0, "kernel_seconds": 0.0,
        "paired_calls": 0, "plan_seconds": 0.0, "fused_calls": 0,
    }  # fmt: skip
    for r in reports:
        out["kernel_seconds"] += r.get("kernel_seconds", 0.0)
        out["plan_seconds"] += r.get("plan_seconds", 0.0)
        out["paired_calls"] += r.get("paired_calls", 0)
        out["fused_calls"] += r.get("fused_calls", 0)
        for key in ("fast_calls", "fallback_calls"):
            for k, v in r[key].items():
                out[key][k] = out[key].get(k, 0) + v
        for key in ("threads", "kernel_threads_max"):
            out[key] = max(out[key], r[key])
    return out


class _LayerStruct(ctypes.Structure):
    """es_layer in kernels/member_lora.c: one layer's stacked tensors as the kernel reads them."""

    _fields_ = [
        ("dtype", ctypes.c_int64),
        ("width_in", ctypes.c_int64),
        ("a_rows", ctypes.c_int64),
        ("n_slots", ctypes.c_int64),
        ("n_slices", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("a", ctypes.c_void_p),
        ("bt", ctypes.c_void_p),
        ("widths", ctypes.c_void_p),
        ("paired", ctypes.c_int64),
        ("work", ctypes.c_int64),
    ]


class _StepStruct(ctypes.Structure):
    """es_step in kernels/member_lora.c: one engine step's grouping and threads."""

    _fields_ = [
        ("slots", ctypes.c_void_p),
        ("canon", ctypes.c_void_p),
        ("order", ctypes.c_void_p),
        ("units", ctypes.c_void_p),
        ("n_units", ctypes.c_int64),
        ("tokens", ctypes.c_int64),
        ("min_work", ctypes.c_int64),
        ("threads", ctypes.c_int64),
    ]


class GemmLora(ctypes.Structure):
    """es_gemm_lora in kernels/member_gemm.c: the member term the fused GEMM's epilogue adds."""

    _fields_ = [
        ("n_slices", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("widths", ctypes.c_void_p),
        ("bt", ctypes.c_void_p),
        ("u_slot", ctypes.c_void_p),
        ("h", ctypes.c_void_p),
    ]


class PairClaim:
    """Which slots hold the two members of an antithetic pair, as their writer vouches for.

    A pair's members are one draw: the same A, and B negated for the minus member (see the worker's
    `_es_build`). Where a layer's slots still hold what was written when the claim was made, the
    kernel reads the plus member's rows once for the tokens of both and negates the minus member's
    rank-r projection, which gives its bits exactly and halves the member rows the kernel reads (at
    rank 4 in an engine that made it under a tenth faster: the rows were not its bottleneck). The claim holds per layer only
    while the layer's stacked tensors are at the versions recorded with it; any later write to a
    layer's slots (vLLM loading another adapter) makes that layer read every slot's own rows again.

    canon: int64, one entry per slot: the plus member's slot for a minus member's, else the slot itself.
    versions: per layer (keyed by id of its tuple of stacked A tensors), the tensors' version counters.
    """

    def __init__(self, canon: torch.Tensor, versions: dict[int, tuple[int, ...]]):
        canon = canon.to(torch.int64).contiguous()
        n = canon.numel()
        if canon.dim() != 1 or bool(((canon < 0) | (canon >= n)).any()):
            raise ValueError(f"canon must list a slot in [0, {n}) for each of the {n} slots")
        index = torch.arange(n)
        partnered = canon != index
        # A pair is two slots: a minus slot points at a plus slot that points at itself, and no two
        # minus slots share one plus slot (the kernel negates every token not of the canonical slot).
        if bool((canon[canon[partnered]] != canon[partnered]).any()):
            raise ValueError("canon points a slot at a slot that is itself grouped under another")
        if int(partnered.sum()) != torch.unique(canon[partnered]).numel():
            raise ValueError("canon groups more than two slots together")
        self.canon, self.versions, self.pairs = canon, dict(versions), int(partnered.sum())


_version = operator.attrgetter("_version")


def layer_versions(a_stacked, b_stacked) -> tuple[int, ...]:
    """The version counters LayerPlan watches: any in-place write to a layer's slots changes them."""
    return (*map(_version, a_stacked), *map(_version, b_stacked))


class StepGroups:
    """The batch's tokens grouped by slot, computed once per engine step and shared by every layer.

    Grouping depends only on which slot each token uses, which vLLM fixes for a whole forward pass.
    The buffers grow with the largest batch seen and are reused (no allocation per step).
    """

    def __init__(self):
        self.order = torch.empty(0, dtype=torch.int64)
        self.units = torch.empty(0, dtype=torch.int64)
        self.slots = None
        self.tokens = 0
        self.bound = 0  # one past the largest slot used
        self.n_units = -1
        self.claim: PairClaim | None = None  # the pairs this step's units group together
        self.canon_ptr = None
        self.struct = _StepStruct()
        self.struct_ptr = ctypes.addressof(self.struct)

    def update(self, lib, slots: torch.Tensor, claim: PairClaim | None = None, threads: int = 1) -> None:
        self.slots, self.tokens = slots, slots.shape[0]
        self.n_units = -1
        self.claim, self.canon_ptr = None, None
        if lib is None or self.tokens == 0:
            return
        if self.order.numel() < self.tokens:
            self.order = torch.empty(self.tokens, dtype=torch.int64)
            self.units = torch.empty(2 * self.tokens, dtype=torch.int64)
        self.bound = int(slots.max()) + 1
        if claim is not None and claim.pairs and self.bound <= claim.canon.numel():
            self.claim, self.canon_ptr = claim, claim.canon.data_ptr()
            self.bound = claim.canon.numel()  # canonical slots may lie past the batch's largest slot
        self.n_units = lib.es_member_group(
            slots.data_ptr(), self.tokens, self.bound, self.canon_ptr, self.order.data_ptr(), self.units.data_ptr()
        )
        self.slots_ptr, self.order_ptr, self.units_ptr = slots.data_ptr(), self.order.data_ptr(), self.units.data_ptr()
        st = self.struct
        st.slots, st.canon, st.order, st.units = self.slots_ptr, self.canon_ptr, self.order_ptr, self.units_ptr
        st.n_units, st.tokens, st.min_work = self.n_units, self.tokens, PARALLEL_MIN_WORK
        st.threads = usable_threads(threads)


class LayerPlan:
    """What the kernel needs about one layer's stacked tensors, checked once.

    vLLM allocates the stacked tensors once per engine and writes adapters into them in place, so
    their dtype, layout and addresses never change; only activations are checked per call. What
    the adapters hold changes when vLLM loads members (each write bumps the tensors' version
    counter); then, once, the plan finds the rank the slots really use (vLLM pads rank 4 to 8, and
    the padding rows are zero) and keeps B transposed to (slots, rank, out) for contiguous updates.
    """

    def __init__(self, a_stacked, b_stacked, output_slices):
        self.a, self.b, self.widths = a_stacked, b_stacked, tuple(output_slices)
        self.watch = (*a_stacked, *b_stacked)  # the tensors whose version counters say they were written
        self.versions = None
        self.bt, self.bt_rank, self.bt_ptrs = None, None, None  # B transposed for the kernel, cut to bt_rank
        self.paired = False
        self.paired_for = (None, None)  # the claim and versions `paired` was decided for
        # (output data pointer, rows) of the GEMM output whose member term the fused GEMM added
        # (member_gemm.py); the layer's LoRA call then has nothing left to add.
        self.fused: tuple[int, int] | None = None
        self.gemm_struct = None  # GemmLora for this layer, built on its first fused call
        self.fusable = all(w % 16 == 0 for w in self.widths)  # the epilogue works in 16-column tiles
        self.reason = self._check()
        if self.reason is None:
            a0 = a_stacked[0]
            self.dtype = a0.dtype
            self.code, self.name = DTYPES[a0.dtype]
            self.n_slots, self.slot_rank, self.width_in = a0.shape[0], a0.shape[2], a0.shape[3]
            n = self.n = len(a_stacked)
            self.a_ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in a_stacked])
            self.b_ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in b_stacked])
            self.c_widths = (ctypes.c_int64 * n)(*self.widths)
            self.total_width = sum(self.widths)
            self.struct = _LayerStruct(
                self.code, self.width_in, self.slot_rank, self.n_slots, n, 0,
                ctypes.addressof(self.a_ptrs), None, ctypes.addressof(self.c_widths),
            )  # fmt: skip
            self.struct_ptr = ctypes.addressof(self.struct)

    def refresh(self, lib, threads: int = 1, versions: tuple[int, ...] | None = None) -> float:
        """Re-reads the used rank and B's transpose if vLLM wrote adapters since the last call.

        `versions`: the layer's version counters if the caller has just read them. Returns the seconds
        it took, 0.0 when nothing was written (the per-call path times nothing).
        """
        if versions is None:
            versions = tuple(map(_version, self.watch))
        if versions == self.versions:
            return 0.0
        start = time.perf_counter()
        elem = self.a[0].element_size()
        rank = lib.es_used_rank(self.a_ptrs, self.n, self.n_slots, self.slot_rank, self.width_in, elem)
        if rank == 1 and self.slot_rank == 1:
            self.bt = self.b  # (slots, 1, out, 1) is already (slots, rank, out) in memory
        elif rank > 0:
            # Into the previous transpose's memory when the rank is unchanged (every generation of a
            # run): fresh pages would be faulted in again each time. Only this layer's calls read it.
            if self.bt_rank != rank:
                self.bt = tuple(torch.empty(self.n_slots, rank, w, dtype=self.dtype) for w in self.widths)
            lib.es_transpose_b(
                self.b_ptrs, self._pointers(self.bt), self.c_widths, self.n, self.n_slots, self.slot_rank, rank,
                elem, threads,
            )  # fmt: skip
        if rank > 0 and (rank != self.bt_rank or self.bt_ptrs is None):
            self.bt_ptrs = self._pointers(self.bt)
        self.rank, self.bt_rank = rank, rank
        self.work = rank * (self.width_in * self.n + sum(self.widths))
        self.struct.rank, self.struct.bt = rank, ctypes.addressof(self.bt_ptrs) if rank > 0 else None
        self.struct.work = self.work
        self.versions = versions
        return time.perf_counter() - start

    def _pointers(self, tensors):
        return (ctypes.c_void_p * self.n)(*[t.data_ptr() for t in tensors])

    def _check(self) -> str | None:
        a_stacked, b_stacked, widths = self.a, self.b, self.widths
        if not len(a_stacked) == len(b_stacked) == len(widths):
            return "slice counts differ"
        dtype = a_stacked[0].dtype
        if dtype not in DTYPES:
            return f"lora dtype {str(dtype).removeprefix('torch.')} (kernel: float32, bfloat16, float16)"
        for a, b, w in zip(a_stacked, b_stacked, widths, strict=True):
            if a.dtype != dtype or b.dtype != dtype:
                return "stacked A/B dtypes differ"
            if not (a.is_contiguous() and b.is_contiguous()) or a.device.type != "cpu":
                return "stacked A/B not contiguous CPU tensors"
            if a.dim() != 4 or b.dim() != 4 or a.shape[1] != 1 or b.shape[1] != 1:
                return "stacked A/B not (slots, 1, rows, cols)"
            if a.shape[2] != a_stacked[0].shape[2] or b.shape[3] != a.shape[2] or b.shape[2] != w:
                return "stacked A/B shapes do not match the output slices"
            if a.shape[3] != a_stacked[0].shape[3] or a.shape[0] != b.shape[0]:
                return "stacked A/B shapes differ between slices"
        if a_stacked[0].shape[2] > MAX_RANK:
            return f"rank {a_stacked[0].shape[2]} > {MAX_RANK}"
        return None


def _refusal(lib, plan: LayerPlan, y, x) -> str | None:
    """Why neither entry point can take this call, for the reasons both share; None if they might."""
    if lib is None:
        return "no compiled kernel"
    if plan.reason is not None:
        return plan.reason
    if x.dtype != plan.dtype or y.dtype != plan.dtype:
        return f"activations {str(x.dtype).removeprefix('torch.')}, lora {str(plan.dtype).removeprefix('torch.')}"
    return None


def _run(plan: LayerPlan, y, x, slots, scale, threads, stats) -> str | None:
    """Runs the C kernel, or returns why it cannot take this call."""
    lib = load()
    reason = _refusal(lib, plan, y, x)
    if reason is not None:
        return reason
    if y.dim() != 2 or y.stride(1) != 1 or x.dim() != 2 or x.shape[1] != plan.width_in:
        return "activations not (tokens, features) with unit column stride"
    if (
        y.shape[1] < plan.total_width
        or y.shape[0] != x.shape[0]
        or slots.dtype != torch.int64
        or slots.shape[0] != x.shape[0]
    ):
        return "output or slot indices do not match the batch"
    if not x.is_contiguous():
        x = x.contiguous()
    reread = plan.refresh(lib, usable_threads(threads))
    if stats is not None:
        stats.plan_seconds += reread
    if plan.rank == 0:  # every slot is empty: nothing to add
        if stats is not None:
            stats.add_fast(plan.name)
        return None
    tokens = x.shape[0]
    threads = 1 if tokens * plan.work < PARALLEL_MIN_WORK else usable_threads(threads)
    start = time.perf_counter()
    rc = lib.es_member_lora(
        plan.code, x.data_ptr(), tokens, plan.width_in, plan.a_ptrs, plan.slot_rank, plan.n_slots, plan.bt_ptrs,
        plan.c_widths,
        plan.n, plan.rank, y.data_ptr(), y.stride(0), 0, slots.data_ptr(), scale, threads,
    )  # fmt: skip
    if rc < 1:
        return "kernel refused its arguments (a slot index past the stacked tensors?)"
    if stats is not None:
        stats.seconds += time.perf_counter() - start
        stats.add_fast(plan.name)
        stats.team = max(stats.team, rc)
    return None


def plan_for(plans: dict, a_stacked, b_stacked, output_slices) -> LayerPlan:
    """The wrapper's plan for a layer's stacked tensors, made on the layer's first call."""
    plan = plans.get(id(a_stacked))
    if plan is None or plan.a is not a_stacked or plan.b is not b_stacked:
        plan = plans[id(a_stacked)] = LayerPlan(a_stacked, b_stacked, output_slices)
    return plan


def _refresh_if_written(plan: LayerPlan, stats, threads: int) -> None:
    """Re-reads the layer's plan if vLLM wrote its slots since (the time counted apart from the kernel's)."""
    versions = tuple(map(_version, plan.watch))
    if versions != plan.versions:
        stats.plan_seconds += plan.refresh(_library, usable_threads(threads), versions)


def _decide_paired(plan: LayerPlan, groups: StepGroups) -> None:
    """Whether the layer reads each claimed pair's rows once, decided again only when the claim or the
    layer's contents changed (refresh replaces `versions`)."""
    claim, decided = groups.claim, plan.paired_for
    if claim is not decided[0] or plan.versions is not decided[1]:
        plan.paired = claim is not None and claim.versions.get(id(plan.a)) == plan.versions
        plan.paired_for = (claim, plan.versions)
        plan.struct.paired = int(plan.paired)


def _run_grouped(plan: LayerPlan, y, x, groups: StepGroups, scale, threads, stats) -> str | None:
    """`_run` for an engine step whose tokens were grouped once (StepGroups): the per-layer hot path.

    Only what can differ between the layers of one step is checked here, and the step's grouping and
    threads reach the kernel in one struct (es_member_lora_step): this runs once per layer and step.
    """
    dtype = plan.dtype if plan.reason is None else None
    if dtype is None or _library is None or x.dtype is not dtype or y.dtype is not dtype:
        return _refusal(_library, plan, y, x)
    xs, ys = x.shape, y.shape
    if xs[0] != groups.tokens or xs[1] != plan.width_in or ys[0] != xs[0] or ys[1] < plan.total_width:
        return "activations not (tokens, features) with unit column stride"
    if y.stride(1) != 1:
        return "activations not (tokens, features) with unit column stride"
    if groups.n_units < 0 or groups.bound > plan.n_slots:
        return "a slot index past the stacked tensors"
    if not x.is_contiguous():
        x = x.contiguous()
    _refresh_if_written(plan, stats, threads)
    if plan.rank == 0:  # every slot is empty: nothing to add
        stats.add_fast(plan.name)
        return None
    _decide_paired(plan, groups)
    start = time.perf_counter()
    rc = _library.es_member_lora_step(
        plan.struct_ptr, groups.struct_ptr, x.data_ptr(), y.data_ptr(), y.stride(0), scale
    )
    stats.seconds += time.perf_counter() - start
    if rc < 1:
        return "kernel refused its arguments (a slot index past the stacked tensors?)"
    stats.add_fast(plan.name)
    stats.paired += plan.paired
    if rc > stats.team:
        stats.team = rc
    return None


def fused_term(punica, lora_a_stacked, lora_b_stacked, output_slices, x) -> tuple[int, LayerPlan] | None:
    """The member term of a layer call for the fused GEMM's epilogue (member_gemm.py), h computed.

    Returns (address of the layer's es_gemm_lora, its plan), or None when the call carries no member
    (pure inference) or the epilogue cannot add its term; then the layer's LoRA call adds it after the
    GEMM, as on every other CPU. Called by the GEMM before vLLM calls add_lora_linear for the layer.
    """
    if not getattr(punica, "_es_kernel", False) or not getattr(punica, "_es_any", False):
        return None
    groups = punica._es_groups
    if groups.slots is not punica._es_slots or groups.n_units < 0 or x.shape[0] != groups.tokens:
        return None
    plan = plan_for(punica._es_plans, lora_a_stacked, lora_b_stacked, output_slices)
    if plan.reason is not None or plan.dtype is not torch.bfloat16 or x.dtype is not torch.bfloat16:
        return None
    if x.shape[1] != plan.width_in or not x.is_contiguous() or groups.bound > plan.n_slots:
        return None
    stats = punica._es_stats
    _refresh_if_written(plan, stats, stats.threads)
    rank = plan.rank
    if rank == 0 or rank > FUSED_MAX_RANK or not plan.fusable:
        return None
    _decide_paired(plan, groups)
    need = groups.tokens * plan.n * rank
    h, u = punica._es_scratch
    if h.numel() < need or u.numel() < groups.tokens:
        h = torch.empty(max(need, h.numel()), dtype=torch.float32)
        u = torch.empty(max(groups.tokens, u.numel()), dtype=torch.int64)
        punica._es_scratch = (h, u)
    start = time.perf_counter()
    rc = _library.es_member_shrink_step(
        plan.struct_ptr, groups.struct_ptr, x.data_ptr(), 1.0, h.data_ptr(), u.data_ptr()
    )
    stats.seconds += time.perf_counter() - start
    if rc < 1:
        return None
    if rc > stats.team:
        stats.team = rc
    st = plan.gemm_struct
    if st is None:
        st = plan.gemm_struct = GemmLora(plan.n, 0, ctypes.addressof(plan.c_widths), None, None, None)
    st.rank, st.bt, st.u_slot, st.h = rank, ctypes.addressof(plan.bt_ptrs), u.data_ptr(), h.data_ptr()
    return ctypes.addressof(st), plan


def member_lora(
    y, x, a_stacked, b_stacked, slots, output_slices, scale: float = 1.0, threads: int | None = None, stats=None
) -> str:
    """y[t, slice k] += B_k[s_t] (scale A_k[s_t] x_t) for every token t whose slot s_t >= 0, in place.

    Returns the path taken: "es-c-<dtype>" or "torch: <why the C kernel could not take it>".
    `threads` defaults to torch's thread count.
    """
    plan = LayerPlan(a_stacked, b_stacked, output_slices)
    slots = slots.contiguous()
    threads = torch.get_num_threads() if threads is None else threads
    reason = _run(plan, y, x, slots, scale, threads, stats)
    if reason is None:
        return f"es-c-{plan.name}"
    if stats is not None:
        stats.add_fallback(reason)
    member_lora_torch(y, x, a_stacked, b_stacked, slots, output_slices, scale)
    return f"torch: {reason}"


_zero_cache: dict[int, tuple[int, bool]] = {}


def _all_zero(t: torch.Tensor) -> bool:
    """Whether a stacked LoRA tensor holds only zeros, re-checked only after it was written.

    vLLM writes adapter slots in place (copy_ into views), which bumps the tensor's version counter.
    """
    seen = _zero_cache.get(id(t))
    if seen is not None and seen[0] == t._version:
        return seen[1]
    zero = not bool(t.any())
    _zero_cache[id(t)] = (t._version, zero)
    return zero


def install(punica) -> bool:
    """Routes a PunicaWrapperCPU's linear LoRA through the member kernel; False if not applicable.

    Only the instance is patched, so other engines in the process keep vLLM's own path, and
    `uninstall` gives this one its own path back (the benchmark times both on one engine).
    """
    if getattr(punica, "_es_kernel", False):
        return True
    if type(punica).__name__ != "PunicaWrapperCPU":
        return False  # GPU wrappers run fused Triton kernels already
    original_update = punica.update_metadata
    original_linear = punica.add_lora_linear
    original_logits = punica.add_lora_logits
    original_embedding = punica.add_lora_embedding
    punica._es_originals = {
        "update_metadata": original_update,
        "add_lora_linear": original_linear,
        "add_lora_logits": original_logits,
        "add_lora_embedding": original_embedding,
    }
    stats = punica._es_stats = getattr(punica, "_es_stats", None) or KernelStats()
    plans: dict[int, LayerPlan] = punica.__dict__.setdefault("_es_plans", {})
    punica._es_scratch = (torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int64))

    groups = punica._es_groups = StepGroups()

    def update_metadata(*args, **kwargs):
        original_update(*args, **kwargs)
        # Decided once per engine step: a batch without adapters (pure inference on this engine)
        # skips the LoRA term entirely instead of visiting every token to find slot -1.
        punica._es_slots = punica.token_lora_indices.contiguous()
        punica._es_any = bool((punica._es_slots >= 0).any())
        # vLLM fixes its compute threads when the worker starts; read here, off the per-layer path.
        stats.threads = torch.get_num_threads()
        if punica._es_any:
            groups.update(load(), punica._es_slots, getattr(punica, "_es_claim", None), stats.threads)

    def add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
        slots = getattr(punica, "_es_slots", None)
        # vLLM passes 2-D tensors already; a reshape or view would cost a tensor object per call.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if slots is None or slots.shape[0] != x2.shape[0]:
            stats.add_fallback("no member slots for this batch")
            return original_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        if not punica._es_any:
            return None
        plan = plan_for(plans, lora_a_stacked, lora_b_stacked, output_slices)
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        fused, plan.fused = plan.fused, None
        if fused is not None and fused == (y2.data_ptr(), y2.shape[0]):
            if scale != 1.0:  # vLLM folds LoRA scaling into B and passes 1.0; the epilogue assumed it
                raise RuntimeError(f"LoRA scale {scale} on a layer whose term the fused GEMM added at scale 1")
            stats.add_fast(plan.name)
            stats.fused += 1
            stats.paired += plan.paired
            return None
        if groups.slots is slots:
            reason = _run_grouped(plan, y2, x2, groups, scale, stats.threads, stats)
        else:
            reason = _run(plan, y2, x2, slots, scale, stats.threads, stats)
        if reason is not None:
            stats.add_fallback(reason)
            member_lora_torch(y2, x2, lora_a_stacked, lora_b_stacked, slots, output_slices, scale)
        return None

    def add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs):
        # ES members leave the head and embeddings untouched; vLLM would still gather a
        # vocabulary-wide B per sequence to add zeros.
        if not punica._es_any or _all_zero(lora_b_stacked):
            return None
        return original_logits(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)

    def add_lora_embedding(y, x, lora_b_stacked, add_inputs=True, **kwargs):
        if add_inputs and (not punica._es_any or _all_zero(lora_b_stacked)):
            return None
        return original_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)

    punica.update_metadata = update_metadata
    punica.add_lora_linear = add_lora_linear
    punica.add_lora_logits = add_lora_logits
    punica.add_lora_embedding = add_lora_embedding
    punica._es_kernel = True
    return True


def set_claim(punica, claim: PairClaim | None) -> None:
    """Gives a wrapper the pairs its slots now hold (None: none), effective from its next layer call.

    vLLM calls update_metadata only when a batch's slot mapping changes, so the step's grouping is
    redone here rather than waiting for it.
    """
    punica._es_claim = claim
    groups = getattr(punica, "_es_groups", None)
    if groups is not None and getattr(punica, "_es_any", False) and groups.slots is punica._es_slots:
        groups.update(load(), punica._es_slots, claim, punica._es_stats.threads)


def uninstall(punica) -> None:
    """Gives a wrapper back vLLM's own LoRA ops (its call counts are kept)."""
    if not getattr(punica, "_es_kernel", False):
        return
    for name in punica._es_originals:
        delattr(punica, name)  # the instance attributes shadowed the class methods
    punica._es_slots = None
    punica._es_kernel = False


def report(wrappers) -> dict:
    """Calls served by the kernel and by the fallback over a worker's wrappers, and what ran."""
    wrappers = list(wrappers)
    merged = merge_reports(w._es_stats.as_dict() for w in wrappers if getattr(w, "_es_stats", None))
    merged["installed"] = bool(wrappers) and all(getattr(w, "_es_kernel", False) for w in wrappers)
    merged["kernel"] = describe(merged) if merged["installed"] else "vllm"
    merged["load_error"] = load_error()
    merged.update(kernel_info())
    return merged
