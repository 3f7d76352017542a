"""Standard normal float32 draws whose bits are the same on every machine (noise version 2).

Why not torch.randn: its Box-Muller transform calls log and cos, and torch's AVX2/AVX-512 kernels
(SLEEF) round them differently from its generic kernels (ARM, older x86, ATEN_CPU_CAPABILITY=default),
so one seed gives different float32 noise on different CPUs. Here every step is either integer
arithmetic modulo 2^64 or an IEEE-754 operation with one correctly rounded result (+, -, *, /, sqrt,
int -> float conversion of integers below 2^53, float64 -> float32 rounding, comparisons, frexp,
ldexp, floor). No libm or SLEEF transcendental is called, and no multiply-add is fused: numpy applies
one operation per ufunc call, and kernels/normal.c (the same algorithm compiled, used when a C
compiler is present; numpy is the fallback) is built with -ffp-contract=off. So any IEEE machine,
whatever its SIMD width, gets the same bits, with or without the compiled kernel.

Bits. A stream is a 64-bit start s (a hash of the noise key); word j is SplitMix64's output
mix(s + (j + 1) G) with G = 0x9E3779B97F4A7C15 and Stafford's "mix13" finaliser, i.e. a window of
the SplitMix64 sequence, which passes BigCrush. Being counter-based, word j needs no words before it,
so the draws of many keys are computed in one vectorised pass. Two keys' windows of length L overlap
only if their random starts lie within L G-steps: probability 2 L / 2^64 per pair of keys (about
1e-16 for L = 2112), and even then the overlap is two unrelated matrices sharing some values.

Normal. Marsaglia and Tsang's ziggurat with 256 layers of equal area V under f(x) = exp(-x^2 / 2),
right edge of the lowest box R = 3.6541528853610088 (the layer tables are computed at import from R
and V with the exact-operation exp and log below, so they are the same on every machine). Word bits:
0-7 the layer, 8 the sign, 11-63 an integer m < 2^53 giving x = m 2^-53 w_layer. If x lies in the
layer's core (m < k_layer, an integer comparison) x is exact and final: 99.3 % of draws, one multiply
and one rounding to float32. The rest finish on the slow path with further words of the same stream
at counters j + 1 + a 2^40 (a = 1, 2, ...; position j of a matrix never reaches 2^40): the wedge test
y < exp(-x^2 / 2) and, in the base layer beyond R, Marsaglia's tail method (x = R + t with
t = -log(U1) / R, accepted when -2 log(U2) > t^2). The ziggurat is exact sampling: the only errors
are the float64 rounding of x (relative 2^-53), then float32 rounding, and the exp/log errors in
the wedge and tail tests (a few ulp, so a test decides differently than the true exp would with
probability ~1e-16 per slow-path draw).

exp(t), t <= 0: k = floor(t / ln 2 + 1/2), s = (t - k ln2_hi) - k ln2_lo (Cody-Waite: ln2_hi has 21
trailing zero bits, so k ln2_hi is exact for |k| < 2^20), |s| <= ln(2) / 2; e^s by its Taylor series
to s^13 (remainder (ln 2 / 2)^14 / 14! < 5e-18) in Horner form; then ldexp by k (exact).
log(u), 0 < u <= 1: u = f 2^e with f in [sqrt(1/2), sqrt(2)) from frexp (exact), s = (f - 1) / (f + 1),
|s| <= 0.1716, log f = 2 atanh s = 2 s (1 + s^2 / 3 + ... + s^22 / 23) (remainder s^25 / 25 < 1e-20),
log u = e ln2_hi + (log f + e ln2_lo). Both are accurate to a few ulp, which only matters through
the accept/reject tests above.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .native import compile_library, compiler_version, find_compiler, kernel_cache_dir

log = logging.getLogger(__name__)

U64 = np.uint64
GAMMA = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
R = 3.6541528853610088  # right edge of the lowest box (Marsaglia and Tsang, 256 layers)
V = 4.928673233974655e-3  # area of every layer: R f(R) + the tail integral of f beyond R
ATTEMPT = 1 << 40  # counter stride between a position's slow-path attempts
LN2_HI = 6.93147180369123816490e-01  # 0x3FE62E42FEE00000
LN2_LO = 1.90821492927058770002e-10
INV_LN2 = 1.44269504088896338700e00
SQRT_HALF = 0.70710678118654752440
EXP_COEFFS = [1.0 / math.factorial(k) for k in range(13, -1, -1)]  # exact integers, one rounded division
LOG_COEFFS = [1.0 / (2 * k + 1) for k in range(11, -1, -1)]


def stream_start(text: str) -> int:
    """The 64-bit start of the stream named by `text` (a noise key's fields)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# -- exact-operation elementary functions (float64 numpy arrays) ---------------------------------
def exp_neg(t: np.ndarray) -> np.ndarray:
    """exp(t) for t <= 0 (not below -700), from +, -, *, floor and ldexp only."""
    k = np.floor(np.add(np.multiply(t, INV_LN2), 0.5))
    s = np.subtract(np.subtract(t, np.multiply(k, LN2_HI)), np.multiply(k, LN2_LO))
    p = np.full_like(s, EXP_COEFFS[0])
    for c in EXP_COEFFS[1:]:
        p = np.add(np.multiply(p, s), c)
    return np.ldexp(p, k.astype(np.int32))


def log_unit(u: np.ndarray) -> np.ndarray:
    """log(u) for 0 < u <= 1, from +, -, *, /, frexp and comparisons only."""
    f, e = np.frexp(u)
    small = f < SQRT_HALF
    f = np.where(small, np.multiply(f, 2.0), f)
    e = np.subtract(e, small.astype(e.dtype)).astype(np.float64)
    s = np.divide(np.subtract(f, 1.0), np.add(f, 1.0))
    z = np.multiply(s, s)
    p = np.full_like(z, LOG_COEFFS[0])
    for c in LOG_COEFFS[1:]:
        p = np.add(np.multiply(p, z), c)
    log_f = np.multiply(np.multiply(s, 2.0), p)
    return np.add(np.multiply(e, LN2_HI), np.add(log_f, np.multiply(e, LN2_LO)))


# -- the ziggurat tables ----------------------------------------------------------------------------
def _tables() -> dict[str, np.ndarray]:
    """Layer edges x_i (x_255 = R down to x_1, x_0 = 0), f(x_i), and the per-word lookups.

    Layer i >= 1 is the box [0, x_i] x [f(x_i), f(x_{i-1})] of area V, so x_{i-1} = f^-1(V / x_i + f(x_i));
    layer 0 is the base strip [0, V / f(R)] x [0, f(R)] whose part beyond R stands for the tail.
    """
    x = np.zeros(256)
    x[255] = R
    for i in range(255, 1, -1):
        xi = x[i : i + 1]
        inner = np.add(np.divide(V, xi), exp_neg(np.multiply(np.multiply(xi, xi), -0.5)))
        x[i - 1] = np.sqrt(np.multiply(log_unit(inner), -2.0))[0]
    f = exp_neg(np.multiply(np.multiply(x, x), -0.5))
    f[0] = 1.0
    width = x.copy()
    width[0] = V / f[255]
    core = np.concatenate([[R], x[:-1]])
    # Integer core bounds: x = m 2^-53 width lies in the core iff m < core / width * 2^53.
    k = np.array([math.floor(c / w * 2.0**53) for c, w in zip(core.tolist(), width.tolist(), strict=True)])
    scale = np.multiply(width, 2.0**-53)
    return {
        "x": x,
        "f": f,
        "df": np.concatenate([[0.0], np.subtract(f[:-1], f[1:])]),  # f(x_{i-1}) - f(x_i)
        "scale": scale,
        # Indexed by the word's low 9 bits: layer = bits 0-7, sign = bit 8.
        "core": np.concatenate([k, k]).astype(np.int64),
        "width": np.concatenate([scale, -scale]),
    }


TABLES = _tables()


# -- bits -------------------------------------------------------------------------------------------
def _mix(z: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Stafford's mix13 on uint64 arrays, in place (numpy integer arithmetic wraps modulo 2^64)."""
    for shift, mult in ((30, MIX1), (27, MIX2)):
        np.right_shift(z, U64(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, U64(mult), out=z)
    np.right_shift(z, U64(31), out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    return z


def words(starts: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """mix(start + counter G) elementwise; counters are the 1-based positions in the stream."""
    z = np.multiply(counters.astype(U64), U64(GAMMA))
    np.add(z, starts.astype(U64), out=z)
    return _mix(z, np.empty_like(z))


def _uniform(w: np.ndarray) -> np.ndarray:
    """(2 k + 1) 2^-53 with k the top 52 bits: exact, in (0, 1), never 0 or 1."""
    k = np.right_shift(w, U64(12)).astype(np.float64)
    return np.multiply(np.add(np.multiply(k, 2.0), 1.0), 2.0**-53)


# -- the fast path ----------------------------------------------------------------------------------
CHUNK = 16384  # elements per numpy pass: the temporaries stay in the L2 cache


def _fast_numpy(starts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The same as kernels/normal.c in numpy: fills out (rows x len), returns the rejected flat indices."""
    rows, length = out.shape
    per = max(1, CHUNK // max(length, 1))
    ahead = np.multiply(np.arange(1, length + 1, dtype=U64), U64(GAMMA))
    size = min(per, rows) * length
    z, tmp, value = np.empty(size, U64), np.empty(size, U64), np.empty(size)
    core, width = TABLES["core"], TABLES["width"]
    rejects = []
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        n = (r1 - r0) * length
        zv, tv, fv = z[:n], tmp[:n], value[:n]
        np.add(starts[r0:r1, None], ahead, out=zv.reshape(r1 - r0, length))
        _mix(zv, tv)
        idx = np.bitwise_and(zv, U64(511), out=tv).view(np.int64)
        m = np.right_shift(zv, U64(11), out=zv).view(np.int64)
        bad = np.flatnonzero(m >= core[idx])
        if bad.size:
            rejects.append(bad + r0 * length)
        np.copyto(fv, m, casting="unsafe")
        np.multiply(fv, width[idx], out=fv)
        out[r0:r1] = fv.reshape(r1 - r0, length)
    return np.concatenate(rejects) if rejects else np.empty(0, np.int64)


# -- the slow path ----------------------------------------------------------------------------------
def _slow(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Finishes the draws whose first word fell outside its layer's core (float64, signed)."""
    t = TABLES
    w = words(starts, positions + 1)
    sign = np.bitwise_and(np.right_shift(w, U64(8)), U64(1)).astype(bool)
    layer = np.bitwise_and(w, U64(255)).astype(np.int64)
    m = np.right_shift(w, U64(11)).astype(np.float64)
    result = np.empty(len(positions))
    todo = np.arange(len(positions))
    attempt = 1
    while todo.size:
        s, p, lay = starts[todo], positions[todo] + 1, layer[todo]
        x = np.multiply(m[todo], t["scale"][lay])
        word_a = words(s, p + (3 * attempt - 2) * ATTEMPT)
        tail = lay == 0
        again = np.zeros(todo.size, bool)
        wedge = np.flatnonzero(~tail)
        if wedge.size:
            lw, xw = lay[wedge], x[wedge]
            y = np.add(t["f"][lw], np.multiply(_uniform(word_a[wedge]), t["df"][lw]))
            ok = y < exp_neg(np.multiply(np.multiply(xw, xw), -0.5))
            result[todo[wedge[ok]]] = xw[ok]
            # Rejected in the wedge: a fresh layer and position, kept at once if inside the core.
            redo = wedge[~ok]
            if redo.size:
                fresh = words(s[redo], p[redo] + 3 * attempt * ATTEMPT)
                new_layer = np.bitwise_and(fresh, U64(255)).astype(np.int64)
                new_m = np.right_shift(fresh, U64(11))
                inside = new_m.view(np.int64) < t["core"][new_layer]
                new_mf = new_m.astype(np.float64)
                done = redo[inside]
                result[todo[done]] = np.multiply(new_mf[inside], t["scale"][new_layer[inside]])
                layer[todo[redo]], m[todo[redo]] = new_layer, new_mf
                again[redo[~inside]] = True
        tails = np.flatnonzero(tail)
        if tails.size:
            word_b = words(s[tails], p[tails] + (3 * attempt - 1) * ATTEMPT)
            dx = np.divide(np.negative(log_unit(_uniform(word_a[tails]))), R)
            dy = np.negative(log_unit(_uniform(word_b)))
            ok = np.add(dy, dy) > np.multiply(dx, dx)
            result[todo[tails[ok]]] = np.add(dx[ok], R)
            again[tails[~ok]] = True
        todo = todo[again]
        attempt += 1
    return np.where(sign, np.negative(result), result)


# -- the compiled fast path -------------------------------------------------------------------------
SOURCE = Path(__file__).with_name("kernels") / "normal.c"
# -ffp-contract=off: no multiply-add may be fused (the kernel has none, but a compiler must not make one).
FLAGS = ["-O2", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
LIBS = ["-lm"]
_library = None
_load_error: str | None = None


def _library_path(compiler: str) -> Path:
    parts = [SOURCE.read_text(), *FLAGS, compiler_version(compiler), platform.machine()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return kernel_cache_dir() / f"normal-{key[:16]}.so"


def build(compiler: str | None = None, flags: Sequence[str] = (), target: Path | None = None) -> Path:
    """Compiles kernels/normal.c once per machine and compiler (later calls find it in the cache).

    Extra `flags` (tests build -O0 and -march=native variants) always rebuild `target`.
    """
    compiler = find_compiler(compiler)
    target = target or _library_path(compiler)
    if flags and target.is_file():
        target.unlink()
    return compile_library(compiler, [*FLAGS, *flags], SOURCE, target, LIBS)


class Kernel:
    """The compiled fast and slow paths."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self.fast, self.slow = lib.es_normal_fast, lib.es_normal_slow
        self.fast.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, i64]
        self.fast.restype = i64
        self.slow.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        self.slow.restype = None


def open_library(path: Path) -> Kernel:
    return Kernel(path)


def load():
    """The compiled fast path, or None (then numpy does the same work, about twice as slowly)."""
    global _library, _load_error
    if _library is None and _load_error is None:
        try:
            _library = open_library(build())
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _load_error = str(exc)
            log.warning("compiled noise kernel unavailable, drawing noise with numpy (same numbers): %s", exc)
    return _library


def _slow_c(kernel: Kernel, starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    starts = np.ascontiguousarray(starts, dtype=U64)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    result = np.empty(len(starts))
    t = TABLES
    kernel.slow(
        starts.ctypes.data,
        positions.ctypes.data,
        len(starts),
        t["core"].ctypes.data,
        t["scale"].ctypes.data,
        t["f"].ctypes.data,
        t["df"].ctypes.data,
        _EXP.ctypes.data,
        _LOG.ctypes.data,
        result.ctypes.data,
    )
    return result


_EXP, _LOG = np.array(EXP_COEFFS), np.array(LOG_COEFFS)


# Streams are independent, so a large draw is split over threads by whole streams: the same bits,
# sooner (a population's draw is tens of millions of values at rank 4). ctypes releases the GIL.
PARALLEL_MIN_VALUES = 1 << 20


def _fast_c(kernel: Kernel, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> np.ndarray:
    parts = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    parts = min(parts, out.size // PARALLEL_MIN_VALUES, len(starts))
    if parts < 2:
        return _fast_c_serial(kernel, starts, lengths, out)
    ends = np.cumsum(lengths)
    cuts = [0, *np.searchsorted(ends, [ends[-1] * k // parts for k in range(1, parts)], side="right"), len(starts)]
    offsets = [0, *ends.tolist()]
    chunks = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]

    def run(chunk):
        a, b = chunk
        return _fast_c_serial(kernel, starts[a:b], lengths[a:b], out[offsets[a] : offsets[b]]) + offsets[a]

    with ThreadPoolExecutor(len(chunks)) as pool:
        return np.concatenate(list(pool.map(run, chunks)))


def _fast_c_serial(kernel: Kernel, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> np.ndarray:
    starts, lengths = np.ascontiguousarray(starts), np.ascontiguousarray(lengths)
    # 40 standard deviations above the expected 1.5 %: a larger count only costs a second pass.
    capacity = out.size // 32 + 1024
    while True:
        rejects = np.empty(capacity, np.int64)
        count = kernel.fast(
            starts.ctypes.data,
            lengths.ctypes.data,
            len(starts),
            TABLES["core"].ctypes.data,
            TABLES["width"].ctypes.data,
            out.ctypes.data,
            rejects.ctypes.data,
            capacity,
        )
        if count <= capacity:
            return rejects[:count]
        capacity = count


def _fast_numpy_ragged(starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> np.ndarray:
    """_fast_numpy over runs of streams of equal length."""
    ends = np.cumsum(lengths)
    cuts = [0, *(np.flatnonzero(np.diff(lengths)) + 1).tolist(), len(lengths)]
    rejects = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        offset = int(ends[a] - lengths[a])
        block = out[offset : offset + int(lengths[a]) * (b - a)].reshape(b - a, int(lengths[a]))
        rejects.append(_fast_numpy(starts[a:b], block) + offset)
    return np.concatenate(rejects) if rejects else np.empty(0, np.int64)


# -- the public entry -------------------------------------------------------------------------------
def fill(starts, lengths, out: np.ndarray, kernel=None) -> None:
    """out (float32, C-contiguous) holds the streams one after another: stream r (start starts[r])
    gets lengths[r] standard normal draws, its values 0..lengths[r]-1, in order.

    kernel: the compiled kernel (default: load()), or False for numpy; both give the same bits.
    """
    starts = np.ascontiguousarray(starts, dtype=U64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("noise output must be a C-contiguous float32 array")
    if starts.shape != lengths.shape or starts.ndim != 1:
        raise ValueError("starts and lengths must be 1-d and of one length")
    if lengths.size and (lengths.min() < 0 or lengths.max() >= ATTEMPT):
        raise ValueError(f"a noise stream holds 0 to {ATTEMPT - 1} values")
    if int(lengths.sum()) != out.size:
        raise ValueError(f"the streams hold {int(lengths.sum())} values but out has {out.size}")
    if out.size == 0:
        return
    flat = out.reshape(-1)
    kernel = load() if kernel is None else kernel
    rejects = _fast_c(kernel, starts, lengths, flat) if kernel else _fast_numpy_ragged(starts, lengths, flat)
    if rejects.size:
        ends = np.cumsum(lengths)
        rows = np.searchsorted(ends, rejects, side="right")
        positions = rejects - (ends[rows] - lengths[rows])
        slow = _slow_c if kernel else _slow
        flat[rejects] = slow(*((kernel,) if kernel else ()), starts[rows], positions)


def load_error() -> str | None:
    """Why the compiled kernel is not in use (None when it is, or before the first draw)."""
    return _load_error
