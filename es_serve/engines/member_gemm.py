"""The trained layers' own GEMM, with each token's member term added before its one rounding.

On CPUs whose bfloat16 GEMMs run on AMX tiles, vLLM's GEMM is fast enough that the member kernel's
separate pass (read every output of the layer back, widen it, add the term, round it again) cost 15-25 %
of the GEMM it follows, and the targets could not be met by trimming it (README, "Where the rest of the
time goes"). Here each trained linear layer runs kernels/member_gemm.c instead of vLLM's oneDNN or sgl
call: an AMX GEMM over weights packed from the float32 masters, whose epilogue adds h . B^T rows (h from
the member kernel's shrink, es_member_shrink_step) to the float32 accumulators of the tokens that carry
a member. The layer's LoRA call then finds its term already added and returns.

Pure inference on the engine runs through the same GEMM (no member term), so the benchmark's ratios
compare like with like; `use_kernel("vllm")` gives the layers vLLM's GEMM back, and the benchmark times
stock pure inference there too. A merge packs the new weights here only; vLLM's own GEMM is rebuilt on
them when something needs it: a call this GEMM does not take (a dtype or layout it was not built for,
counted), or the switch to vLLM's ops.
Where the CPU has no AMX, or the build has no AMX path, nothing is installed. It is opt-in
(ES_SERVE_FUSED_GEMM=1): see ENV for why.

Memory: the packed weights are one more bfloat16 copy of the trained layers (2 bytes per trained weight).
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import member_kernel

# Set to 1 to run the trained layers on this GEMM where the CPU has AMX. Off by default: on the 2-core
# Xeon it was measured on, it ran the trained layers' GEMMs in about 0.8 of vLLM's time
# (benchmarks/member_gemm.py), but in a whole engine the gain stayed within the machine's spread between
# repeats and the ratios moved both ways (README, "The fused GEMM").
ENV = "ES_SERVE_FUSED_GEMM"


def declare(lib: ctypes.CDLL) -> None:
    """The GEMM's and the shrink's C signatures (member_kernel.open_library calls this)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.es_gemm_available.restype = ctypes.c_int
    lib.es_gemm_available.argtypes = []
    lib.es_gemm_packed_elems.restype = i64
    lib.es_gemm_packed_elems.argtypes = [i64, i64]  # n_out, k
    lib.es_gemm_pack.restype = ctypes.c_int
    lib.es_gemm_pack.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]  # w, n_out, k, packed, threads
    lib.es_gemm_pack_f32.restype = ctypes.c_int
    lib.es_gemm_pack_f32.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]  # w, row0, rows, k, packed, threads
    lib.es_gemm.restype = ctypes.c_int
    # x, m, x row stride, packed, n_out, k, bias, y, y row stride, lora, threads
    lib.es_gemm.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.es_member_shrink_step.restype = ctypes.c_int
    # layer, step, x, scale, h, u_slot
    lib.es_member_shrink_step.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, ptr]


def supported() -> bool:
    """Whether this machine and build can run the fused GEMM: AMX, and Linux granted it to this process."""
    lib = member_kernel.load()
    return lib is not None and bool(lib.es_gemm_available())


def enabled() -> bool:
    """Whether the engine should install it where supported (ES_SERVE_FUSED_GEMM=1; off by default)."""
    value = os.environ.get(ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(
            f"{ENV} must be 1 (use the fused GEMM where the CPU has AMX) or 0 (vLLM's GEMM), got {value!r}"
        )
    return value == "1"


class FusedLinear:
    """One trained linear layer served by the fused GEMM: its packed weights and the call vLLM makes.

    Installed as the base layer's `cpu_linear`, the hook vLLM's CPU linear layers call with
    (x, weight, bias); `stock` is the one vLLM built, used for any call this GEMM does not take.
    """

    def __init__(self, lib: ctypes.CDLL, base, lora_layer):
        self.lib, self.base, self.lora = lib, base, lora_layer
        self.n_out, self.k = int(base.output_size_per_partition), int(base.input_size_per_partition)
        elems = lib.es_gemm_packed_elems(self.n_out, self.k)
        self.reason = None if elems > 0 else f"shape ({self.n_out}, {self.k}) not supported by the AMX GEMM"
        self.packed = torch.empty(max(int(elems), 0), dtype=torch.bfloat16)
        self.stock = base.cpu_linear
        self.bias_seen: tuple[int, int] | None = None  # (data pointer, version) of the bias last converted
        self.bias16: torch.Tensor | None = None
        self.calls = {"plain": 0, "fused": 0, "stock": {}}
        # Set by a merge that packed new weights here but left vLLM's GEMM on the old ones: rebuilding
        # it (oneDNN packs the weights again) took over half of a merge's push on the 2-core Xeon, and
        # it serves only refused calls and the `use_kernel("vllm")` baseline, so it is rebuilt when one
        # of those needs it.
        self.rebuild_stock = None
        self.stock_rebuilds = 0

    def pack(self, weight: torch.Tensor) -> None:
        """Packs the layer's current weights, (n_out, k) in bfloat16 (built from the masters)."""
        weight = weight.to(torch.bfloat16).contiguous()
        if tuple(weight.shape) != (self.n_out, self.k):
            raise ValueError(f"weights {tuple(weight.shape)} for a ({self.n_out}, {self.k}) layer")
        rc = self.lib.es_gemm_pack(
            weight.data_ptr(), self.n_out, self.k, self.packed.data_ptr(), member_kernel.worker_threads()
        )
        if rc != 0:
            raise RuntimeError(f"packing ({self.n_out}, {self.k}) weights for the AMX GEMM failed")

    def pack_masters(self, parts: list[torch.Tensor]) -> None:
        """Packs the layer's weights from its float32 shards (the masters, stacked in row order), each
        rounded to bfloat16 as `pack` would: the same bits without building the bfloat16 weights first."""
        if sum(p.shape[0] for p in parts) != self.n_out or any(
            p.dtype != torch.float32 or p.shape[0] % 16 or tuple(p.shape[1:]) != (self.k,) for p in parts
        ):
            self.pack(torch.cat([p.to(torch.bfloat16) for p in parts]))
            return
        row, threads = 0, member_kernel.worker_threads()
        for p in parts:
            p = p.contiguous()
            if self.lib.es_gemm_pack_f32(p.data_ptr(), row, p.shape[0], self.k, self.packed.data_ptr(), threads) != 0:
                raise RuntimeError(f"packing rows {row}-{row + p.shape[0]} of a ({self.n_out}, {self.k}) layer failed")
            row += p.shape[0]

    def _bias(self, bias: torch.Tensor | None) -> int | None:
        if bias is None:
            return None
        if bias.dtype is torch.bfloat16 and bias.is_contiguous():
            return bias.data_ptr()
        # vLLM's sgl path keeps biases in float32, converted from the model's bfloat16: back is exact.
        seen = (bias.data_ptr(), bias._version)
        if seen != self.bias_seen:
            self.bias16, self.bias_seen = bias.to(torch.bfloat16).contiguous(), seen
        return self.bias16.data_ptr()

    def current_stock(self):
        """vLLM's GEMM for the layer, rebuilt first if a merge left it on older weights.

        A rebuild that fails leaves the layer marked stale (the next call tries again, never running the
        old weights) and this GEMM installed where it was.
        """
        if self.rebuild_stock is not None:
            installed = self.base.cpu_linear is self
            try:
                self.stock = self.rebuild_stock()
            finally:
                if installed:  # vLLM's dispatch replaced the hook, whether or not it finished
                    self.base.cpu_linear = self
            self.rebuild_stock = None
            self.stock_rebuilds += 1
        return self.stock

    def _refuse(self, why: str, x, weight, bias):
        self.calls["stock"][why] = self.calls["stock"].get(why, 0) + 1
        return self.current_stock()(x, weight, bias)

    def __call__(self, x: torch.Tensor, weight, bias=None):
        if self.reason is not None:
            return self._refuse(self.reason, x, weight, bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype is not torch.bfloat16 or x2.shape[1] != self.k or x2.stride(1) != 1 or x2.shape[0] == 0:
            return self._refuse("activations not (tokens, k) bfloat16 with unit column stride", x, weight, bias)
        m = x2.shape[0]
        y = torch.empty(m, self.n_out, dtype=torch.bfloat16)
        lora = self.lora
        term = member_kernel.fused_term(
            lora.punica_wrapper, lora.lora_a_stacked, lora.lora_b_stacked, lora.output_slices, x2
        )
        rc = self.lib.es_gemm(
            x2.data_ptr(), m, x2.stride(0), self.packed.data_ptr(), self.n_out, self.k, self._bias(bias),
            y.data_ptr(), self.n_out, None if term is None else term[0], member_kernel.worker_threads(),
        )  # fmt: skip
        if rc < 1:
            return self._refuse("the AMX GEMM refused its arguments", x, weight, bias)
        if term is None:
            self.calls["plain"] += 1
        else:
            # What the layer's LoRA call checks to know its term is in this output already.
            term[1].fused = (y.data_ptr(), m)
            self.calls["fused"] += 1
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.n_out)


def install(layers) -> list[FusedLinear]:
    """FusedLinear for each (base layer, LoRA layer, bfloat16 weights) given; [] where it cannot run."""
    if not supported():
        return []
    lib = member_kernel.load()
    fused = []
    for base, lora_layer, weight in layers:
        if getattr(base, "params_dtype", None) is not torch.bfloat16:
            return []  # one dtype per model: float32 and float16 keep vLLM's GEMM and the member kernel
        f = FusedLinear(lib, base, lora_layer)
        if f.reason is None:
            f.pack(weight)
            base.cpu_linear = f
        fused.append(f)
    return fused


def restore(fused: list[FusedLinear]) -> None:
    """vLLM's GEMM back on every layer (the benchmark's stock baseline)."""
    for f in fused:
        f.base.cpu_linear = f.current_stock()


def reinstate(fused: list[FusedLinear]) -> None:
    """The fused GEMM again on every layer it supports (after `restore`)."""
    for f in fused:
        if f.reason is None:
            f.base.cpu_linear = f


def repack(f: FusedLinear, weight: torch.Tensor, active: bool) -> None:
    """After a merge rebuilt vLLM's GEMM for the layer: keep it as the stock path, pack the new weights."""
    f.stock = f.base.cpu_linear if not isinstance(f.base.cpu_linear, FusedLinear) else f.stock
    f.rebuild_stock = None
    if f.reason is None:
        f.pack(weight)
        if active:
            f.base.cpu_linear = f


def pack_only(f: FusedLinear, parts: list[torch.Tensor], rebuild_stock) -> bool:
    """A merge's new weights for a layer the fused GEMM serves, from its float32 shards in row order:
    packed here, vLLM's GEMM left to `rebuild_stock()` (which returns the rebuilt one) until a call needs
    it. False, nothing done, where the layer is not on the fused GEMM now; the caller then rebuilds
    vLLM's GEMM and calls `repack`."""
    if f.reason is not None or f.base.cpu_linear is not f:
        return False
    f.pack_masters(parts)
    f.rebuild_stock = rebuild_stock
    return True


def report(fused: list[FusedLinear]) -> dict:
    """Which GEMM served the trained layers, with call counts (and why any call went to vLLM's)."""
    active = [f for f in fused if f.base.cpu_linear is f]
    stock: dict[str, int] = {}
    for f in fused:
        for why, n in f.calls["stock"].items():
            stock[why] = stock.get(why, 0) + n
    return {
        "gemm": "es-amx-bf16" if active else "vllm",
        "gemm_layers": len(active),
        "gemm_calls_plain": sum(f.calls["plain"] for f in fused),
        "gemm_calls_fused": sum(f.calls["fused"] for f in fused),
        "gemm_calls_stock": stock,
        "gemm_packed_bytes": sum(f.packed.numel() * 2 for f in fused),
        # Layers whose vLLM GEMM still has pre-merge weights (rebuilt when a call needs it), and rebuilds so far.
        "gemm_stock_stale": sum(f.rebuild_stock is not None for f in fused),
        "gemm_stock_rebuilds": sum(f.stock_rebuilds for f in fused),
    }
