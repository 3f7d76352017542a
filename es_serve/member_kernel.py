"""A LoRA step specialised for ES members, swapped into vLLM's CPU LoRA path.

Every token of an ES batch belongs to exactly one low-rank member, so the LoRA term of a layer is,
per token, r dot products with the member's A rows and r scaled copies of its B columns. vLLM's
CPU ops instead gather each token's whole A and B into new tensors and run batched einsums; at rank
1 those copies and per-call costs, not the arithmetic, took a fifth of decode time. The kernel in
kernels/member_lora.c reads the rows in place and writes into the layer output directly.

It is compiled once per machine with the system C compiler (a plain shared library called through
ctypes, no torch headers, so it builds in about a second). Without a compiler, or for tensors it
does not handle (not float32, not contiguous), the pure-torch `member_lora_torch` does the same sum.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "member_lora.c"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC"]
MAX_RANK = 512
_library: ctypes.CDLL | None = None
_load_error: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("ES_SERVE_CACHE") or Path.home() / ".cache" / "es-serve"
    return Path(root) / "kernels"


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


def library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_signature()]).encode()).hexdigest()
    return cache_dir() / f"member_lora-{key[:16]}.so"


def build(compiler: str | None = None) -> Path:
    """Compiles the kernel into the cache (once; later calls find it) and returns its path."""
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH (install gcc, or set CC)")
    target = library_path(compiler)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: concurrent builders each finish a whole file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (the reason is logged once and kept in `load_error()`)."""
    global _library, _load_error
    if _library is not None or _load_error is not None:
        return _library
    try:
        lib = ctypes.CDLL(str(build()))
        fn = lib.es_member_lora
        fn.restype = None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_float]
        _library = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _load_error = str(exc)
        log.warning("ES member kernel unavailable, using the torch fallback: %s", exc)
    return _library


def load_error() -> str | None:
    return _load_error


def member_lora_torch(y, x, a_stacked, b_stacked, slots, output_slices, scale: float = 1.0) -> None:
    """Same sum as the C kernel in torch: y[t, slice] += B[s_t] (scale A[s_t] x_t) for s_t >= 0."""
    rows = (slots >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    s = slots.index_select(0, rows)
    xs = x.index_select(0, rows)
    offset = 0
    for a, b, width in zip(a_stacked, b_stacked, output_slices, strict=True):
        a_sel = a[:, 0].index_select(0, s).to(x.dtype)  # (t, rank, in)
        b_sel = b[:, 0].index_select(0, s).to(x.dtype)  # (t, out, rank)
        h = torch.bmm(a_sel, xs.unsqueeze(-1)) * scale  # (t, rank, 1)
        y[rows, offset : offset + width] += torch.bmm(b_sel, h).squeeze(-1)[:, :width].to(y.dtype)
        offset += width


def member_lora(y, x, a_stacked, b_stacked, slots, output_slices, scale: float = 1.0) -> None:
    """y[t, slice k] += B_k[s_t] (scale A_k[s_t] x_t) for every token t whose slot s_t >= 0, in place."""
    lib = load()
    fast = (
        lib is not None
        and y.dtype == x.dtype == torch.float32
        and y.dim() == 2
        and y.stride(1) == 1
        and x.is_contiguous()
        and slots.dtype == torch.int64
        and slots.is_contiguous()
        and all(a.dtype == torch.float32 and a.is_contiguous() for a in a_stacked)
        and all(b.dtype == torch.float32 and b.is_contiguous() for b in b_stacked)
        and a_stacked[0].shape[2] <= MAX_RANK
    )
    if not fast:
        member_lora_torch(y, x, a_stacked, b_stacked, slots, output_slices, scale)
        return
    tokens, width_in = x.shape
    offset = 0
    for a, b, width in zip(a_stacked, b_stacked, output_slices, strict=True):
        lib.es_member_lora(
            x.data_ptr(), tokens, width_in, a.data_ptr(), b.data_ptr(), a.shape[2], width,
            y.data_ptr(), y.stride(0), offset, slots.data_ptr(), scale,
        )  # fmt: skip
        offset += width


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
    """Routes a PunicaWrapperCPU's linear LoRA through `member_lora`; returns False if not applicable.

    Only the instance is patched, so other engines in the process keep vLLM's own path.
    """
    if getattr(punica, "_es_kernel", False):
        return True
    if type(punica).__name__ != "PunicaWrapperCPU":
        return False  # GPU wrappers run fused Triton kernels already
    original_update = punica.update_metadata
    original_linear = punica.add_lora_linear

    def update_metadata(*args, **kwargs):
        original_update(*args, **kwargs)
        # Decided once per engine step: a batch without adapters (pure inference on this engine)
        # skips the LoRA term entirely instead of visiting every token to find slot -1.
        punica._es_slots = punica.token_lora_indices.contiguous()
        punica._es_any = bool((punica._es_slots >= 0).any())

    def add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
        slots = getattr(punica, "_es_slots", None)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if slots is None or slots.shape[0] != x2.shape[0]:
            return original_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        if punica._es_any:
            member_lora(y2, x2.contiguous(), lora_a_stacked, lora_b_stacked, slots, output_slices, scale)
        return None

    original_logits = punica.add_lora_logits
    original_embedding = punica.add_lora_embedding

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
