/* A layer's bf16 GEMM on AMX with each token's ES member term fused into the epilogue.
 *
 * y = x W^T (+ bias) (+ the token's low-rank term h U), float32 throughout, rounded to bf16 once.
 * Fusing the member term saves the separate read-modify-write of y that a LoRA pass after oneDNN's
 * GEMM costs (15-25 % of that GEMM at decode shapes on a 2-core Xeon with AMX), and at those shapes
 * this GEMM alone took 0.6-0.9 of the time of vLLM's oneDNN call (benchmarks/member_gemm.py).
 *
 * Layout: W is packed once into VNNI tiles, [n_out/16][k/32][16 k-pairs][16 cols x 2], so each
 * 16-column panel is one contiguous stream and every B tile is a 1 KB contiguous load.
 * Shapes: n_out % 32 == 0 and k % 32 == 0 (blocks are 32 columns, two B tiles).
 *
 * Blocking: a block is 32 rows x 32 columns (2x2 tiles of 16x16, the whole k in the accumulators, so
 * each output's summation order is fixed and the result cannot depend on the thread split). Column
 * pairs are taken in groups of 4; a group runs down all rows of an m-chunk, so its weights (k * 256
 * bytes) stay in L1/L2 while x streams, and the next group's weights are prefetched during the
 * current one, spread evenly over its blocks, as are the member rows the next group's tokens read.
 * Rows go in m-chunks of 512 (more when k is small) so prefill's x panel stays in L2; decode batches
 * up to 512 rows are one chunk, so each weight is read once per call. Each block's tiles go to one
 * of two f32 scratch buffers and its epilogue (bias, member term, rounding, store) is done a few rows
 * per k-step inside the next block's AMX loop, where it hides behind the tile multiplies. Row tails
 * (m % 32) use a tile configuration with fewer rows rather than reading past x. Rounding is
 * vcvtne2ps2bf16: nearest-even, NaN stays NaN, results below bf16's normal range flush to zero.
 *
 * Threads: columns are split in whole pairs when that balances; otherwise (few columns, e.g. a
 * 32- or 96-wide output) rows are split in 32-row blocks. Every thread loads its own tile
 * configuration on each call, since oneDNN runs AMX on the same pool between our calls and leaves
 * its own, and releases the tiles at the end.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define ES_GEMM_AMX 1
#include <immintrin.h>
#endif

#define ES_GEMM_MAX_RANK 16
#define ES_GEMM_GROUP 4            /* column pairs per group (measured best of 2..8 at decode shapes) */
#define ES_GEMM_X_CHUNK (1 << 19)  /* bytes of x per m-chunk (L2 is 2 MB), but at least: */
#define ES_GEMM_MIN_CHUNK 512      /* rows per m-chunk */
#define ES_GEMM_PF_SLOTS 512       /* distinct slots whose member rows are prefetched per group */
#define ES_GEMM_SLOT_BITS 4096     /* slots tracked for de-duplication before prefetching */

typedef struct {
    int64_t n_slices, rank;      /* rank 1..16 */
    const int64_t *widths;       /* output columns per slice, in order; each a multiple of 16; they sum to n_out */
    const void *const *bt;       /* per slice k: bf16 (n_slots, rank, widths[k]) row-major contiguous */
    const int64_t *u_slot;       /* per row t of x: the slot whose rows of bt[k] to add; < 0 adds nothing */
    const float *h;              /* per row t: n_slices * rank floats, h[(t * n_slices + k) * rank + j] */
} es_gemm_lora;

/* Elements of the packed form of an (n_out x k) weight, or -1 when the shape is not supported. */
int64_t es_gemm_packed_elems(int64_t n_out, int64_t k) {
    if (n_out <= 0 || k <= 0 || n_out % 32 || k % 32) return -1;
    if (n_out > ((int64_t)1 << 40) / k) return -1; /* keeps every offset far from overflow */
    return n_out * k;
}

/* Column blocks [nb0, nb0 + nb_n) of the packed form from w's rows (nb_n * 16 of them, k columns each),
 * bf16 as they are or float32 rounded to bf16 as torch rounds (f32 != 0). */
static void gemm_pack_rows(const void *w, int f32, int64_t nb0, int64_t nb_n, int64_t k, uint16_t *packed,
                           int threads) {
    const int64_t kb_n = k / 32;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) if (threads > 1) schedule(static)
#endif
    for (int64_t nb = 0; nb < nb_n; nb++)
        for (int64_t kb = 0; kb < kb_n; kb++) {
            uint16_t *t = packed + ((nb0 + nb) * kb_n + kb) * 512;
            for (int c = 0; c < 16; c++) {
                const int64_t at = (nb * 16 + c) * k + kb * 32;
                for (int i = 0; i < 32; i++)
                    t[(i >> 1) * 32 + 2 * c + (i & 1)] =
                        f32 ? bf16_store(((const float *)w)[at + i]) : ((const uint16_t *)w)[at + i];
            }
        }
}

/* Packs w, bf16 (n_out x k) row-major, for es_gemm. Plain C, so it works in every build. 0, or -1. */
int es_gemm_pack(const uint16_t *w, int64_t n_out, int64_t k, uint16_t *packed, int threads) {
    if (!w || !packed || es_gemm_packed_elems(n_out, k) < 0) return -1;
    gemm_pack_rows(w, 0, 0, n_out / 16, k, packed, threads);
    return 0;
}

/* Packs rows [row0, row0 + rows) of a layer's weights for es_gemm straight from float32 (a merge's
 * masters, one checkpoint shard at a time), rounding each to bf16 as torch does, into `packed` laid out
 * for the whole layer (k columns). Skips the bf16 copy of the weights the other route builds first, one
 * pass over the masters fewer per merge. row0 and rows multiples of 16 (whole packed column blocks).
 * 0, or -1 with nothing written. */
int es_gemm_pack_f32(const float *w, int64_t row0, int64_t rows, int64_t k, uint16_t *packed, int threads) {
    if (!w || !packed || row0 < 0 || rows < 1 || row0 % 16 || rows % 16 || k <= 0 || k % 32 ||
        row0 + rows > ((int64_t)1 << 40) / k)
        return -1;
    gemm_pack_rows(w, 1, row0 / 16, rows / 16, k, packed, threads);
    return 0;
}

#if defined(ES_GEMM_AMX) && defined(__linux__) && defined(__x86_64__)
/* Raw syscall so this file needs no _GNU_SOURCE (the includer's headers come first). */
static long gemm_arch_prctl(long code, long arg) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(158L /* SYS_arch_prctl */), "D"(code), "S"(arg)
                     : "rcx", "r11", "memory");
    return ret;
}

/* 1 when this build has AMX and Linux granted this process the tile data state; asked once. */
int es_gemm_available(void) {
    /* 0 unknown, 1 granted, -1 refused; a race only repeats an idempotent request. */
    static volatile int state = 0;
    int s = state;
    if (s == 0) {
        s = gemm_arch_prctl(0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        state = s;
    }
    return s == 1;
}
#else
int es_gemm_available(void) { return 0; }
#endif

#ifdef ES_GEMM_AMX

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} gemm_tilecfg;
_Static_assert(sizeof(gemm_tilecfg) == 64, "ldtilecfg reads 64 bytes");

/* Tiles 0-3 accumulate (rows r0 / r1 of the block), 4-5 hold x, 6-7 hold W. */
static void gemm_tile_config(int r0, int r1) {
    gemm_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
    for (int i = 0; i < 8; i++)
        if (rows[i] > 0) {
            cfg.rows[i] = (uint8_t)rows[i];
            cfg.colsb[i] = 64;
        }
    __asm__ volatile("" : : "r"(&cfg) : "memory"); /* the intrinsic's asm claims to read only 8 bytes */
    _tile_loadconfig(&cfg);
}

typedef struct {
    const uint16_t *x, *P, *bias;
    uint16_t *y;
    int64_t m, xs, n, k, kb_n, ys;
    const es_gemm_lora *L;
} gemm_args;

/* The finished f32 block whose epilogue is pending, with what its rows need. */
typedef struct {
    const float *buf; /* 4 tiles of 16x16 f32: rows 0-15 cols 0-15, 0-15/16-31, 16-31/0-15, 16-31/16-31 */
    int64_t m0, n0;
    int rows, active;
    const uint16_t *ub[2]; /* each 16-column half's first member row (slot 0, j 0) */
    int64_t uw[2];         /* its slice's width: the stride of member rows */
    const float *h[2];     /* row 0's coefficients for each half's slice; rows are hs floats apart */
    int64_t hs, one_slice; /* one_slice: both halves in one slice (one broadcast per rank) */
    __m512 bias[2];
} gemm_epi;

/* The member rows of the last slot seen, widened, kept while consecutive rows share a slot. Local to
   each block's epilogue so that, with the rank a constant, they can live in registers. */
typedef struct {
    int64_t slot;
    __m512 u[2][ES_GEMM_MAX_RANK];
} gemm_ucache;

static inline __attribute__((always_inline)) void gemm_ucache_init(gemm_ucache *U, const int64_t r) {
    U->slot = -1; /* forces a load at the first row with a slot; the zeros only quiet -Wmaybe-uninitialized */
    for (int64_t j = 0; j < r; j++) U->u[0][j] = U->u[1][j] = _mm512_setzero_ps();
}

static inline void gemm_slice_of(const es_gemm_lora *L, int64_t col, int64_t *slice, int64_t *ofs) {
    int64_t s = 0, start = 0;
    while (s + 1 < L->n_slices && col >= start + L->widths[s]) start += L->widths[s++];
    *slice = s;
    *ofs = col - start;
}

static inline __m512 gemm_widen(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* r is a constant at each call site below, so the rank loops unroll and the member rows stay in registers. */
static inline __attribute__((always_inline)) void gemm_epi_row_r(const gemm_epi *E, gemm_ucache *U, int i,
                                                                  const gemm_args *A, const int64_t r) {
    const float *b0 = E->buf + (i < 16 ? 0 : 512) + (i & 15) * 16;
    __m512 a0 = _mm512_load_ps(b0), a1 = _mm512_load_ps(b0 + 256);
    const int64_t t = E->m0 + i;
    if (A->bias) {
        a0 = _mm512_add_ps(a0, E->bias[0]);
        a1 = _mm512_add_ps(a1, E->bias[1]);
    }
    const es_gemm_lora *L = A->L;
    if (r > 0) {
        const int64_t s = L->u_slot[t];
        if (s >= 0) {
            if (s != U->slot) {
                U->slot = s;
                for (int hf = 0; hf < 2; hf++) {
                    const uint16_t *u = E->ub[hf] + s * r * E->uw[hf];
                    for (int64_t j = 0; j < r; j++)
                        U->u[hf][j] = gemm_widen(_mm256_loadu_si256((const __m256i *)(u + j * E->uw[hf])));
                }
            }
            const float *h0 = E->h[0] + t * E->hs;
            if (E->one_slice) { /* the common case: both halves in one slice, one broadcast */
                for (int64_t j = 0; j < r; j++) {
                    const __m512 c = _mm512_set1_ps(h0[j]);
                    a0 = _mm512_fmadd_ps(c, U->u[0][j], a0);
                    a1 = _mm512_fmadd_ps(c, U->u[1][j], a1);
                }
            } else {
                const float *h1 = E->h[1] + t * E->hs;
                for (int64_t j = 0; j < r; j++) {
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(h0[j]), U->u[0][j], a0);
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(h1[j]), U->u[1][j], a1);
                }
            }
        }
    }
    _mm512_storeu_si512((void *)(A->y + t * A->ys + E->n0), (__m512i)_mm512_cvtne2ps_pbh(a1, a0));
}

static inline void gemm_epi_set(gemm_epi *E, const gemm_args *A, const float *buf, int64_t m0, int rows,
                                int64_t n0) {
    E->buf = buf;
    E->m0 = m0;
    E->rows = rows;
    E->n0 = n0;
    E->active = 1;
    if (A->bias) {
        E->bias[0] = gemm_widen(_mm256_loadu_si256((const __m256i *)(A->bias + n0)));
        E->bias[1] = gemm_widen(_mm256_loadu_si256((const __m256i *)(A->bias + n0 + 16)));
    }
    if (A->L) {
        int64_t sl[2], ofs;
        for (int hf = 0; hf < 2; hf++) {
            gemm_slice_of(A->L, n0 + 16 * hf, &sl[hf], &ofs);
            E->h[hf] = A->L->h + sl[hf] * A->L->rank;
            E->uw[hf] = A->L->widths[sl[hf]];
            E->ub[hf] = (const uint16_t *)A->L->bt[sl[hf]] + ofs;
        }
        E->hs = A->L->n_slices * A->L->rank;
        E->one_slice = sl[0] == sl[1];
    }
}

/* always_inline: as a separate function GCC judges it free of side effects and deletes the calls. */
static inline __attribute__((always_inline)) void gemm_prefetch_lines(const char *pf, int64_t from, int64_t to) {
    for (int64_t l = from; l < to; l++) _mm_prefetch(pf + l * 64, _MM_HINT_T0);
}

/* One 32-column block of `rows` (<= 32) rows at m0 into cur, finishing E's rows along the way. The
   tile configuration must match rows. pf[0, pf_n) are cache lines to prefetch, ppk per k-step. */
static inline __attribute__((always_inline)) void gemm_block(const gemm_args *A, int64_t np, int64_t m0, int rows,
                                                             float *cur, gemm_epi *E, const char *pf, int64_t pf_n,
                                                             int64_t ppk, const int64_t r) {
    const int64_t kb_n = A->kb_n, xsb = A->xs * 2;
    const uint16_t *B0 = A->P + np * 2 * kb_n * 512, *B1 = B0 + kb_n * 512;
    const uint16_t *A0 = A->x + m0 * A->xs, *A1 = A0 + 16 * A->xs;
    const int erows = E->active ? E->rows : 0, rpk = (int)((erows + kb_n - 1) / kb_n);
    int row = 0;
    gemm_ucache U;
    gemm_ucache_init(&U, r);
    if (rows > 16) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t kb = 0; kb < kb_n; kb++) {
            if (pf) gemm_prefetch_lines(pf, kb * ppk, (kb + 1) * ppk < pf_n ? (kb + 1) * ppk : pf_n);
            _tile_loadd(4, A0 + kb * 32, xsb);
            _tile_loadd(6, B0 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, B1 + kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, A1 + kb * 32, xsb);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            for (int q = 0; q < rpk && row < erows; q++, row++) gemm_epi_row_r(E, &U, row, A, r);
        }
    } else {
        _tile_zero(0); _tile_zero(1);
        for (int64_t kb = 0; kb < kb_n; kb++) {
            if (pf) gemm_prefetch_lines(pf, kb * ppk, (kb + 1) * ppk < pf_n ? (kb + 1) * ppk : pf_n);
            _tile_loadd(4, A0 + kb * 32, xsb);
            _tile_loadd(6, B0 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, B1 + kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            for (int q = 0; q < rpk && row < erows; q++, row++) gemm_epi_row_r(E, &U, row, A, r);
        }
    }
    for (; row < erows; row++) gemm_epi_row_r(E, &U, row, A, r);
    _tile_stored(0, cur, 64);
    _tile_stored(1, cur + 256, 64);
    if (rows > 16) {
        _tile_stored(2, cur + 512, 64);
        _tile_stored(3, cur + 768, 64);
    }
    gemm_epi_set(E, A, cur, m0, rows, np * 32);
}

/* Prefetch part [q0, q1) of the next group's member rows: lines indexed (slot, j, half, pair). */
static inline __attribute__((always_inline)) void gemm_prefetch_members(const gemm_args *A, const int64_t *slots,
                                                                        const uint16_t *const *base,
                                                                        const int64_t *stride, int64_t halves,
                                                                        int64_t q0, int64_t q1) {
    const int64_t r = A->L->rank;
    for (int64_t q = q0; q < q1; q++) {
        int64_t hp = q % halves, sj = q / halves;
        int64_t s = slots[sj / r], j = sj % r;
        _mm_prefetch((const char *)(base[hp] + (s * r + j) * stride[hp]), _MM_HINT_T1);
    }
}

/* This thread's share: column pairs [np0, np1) of rows [r0, r1). r is the member rank (0: none), a constant
   at each call site so the epilogue is specialized once per call rather than branched per row. */
static inline __attribute__((always_inline)) void gemm_run_r(const gemm_args *A, int64_t np0, int64_t np1,
                                                             int64_t r0, int64_t r1, const int64_t r) {
    float scratch[2][1024] __attribute__((aligned(64)));
    int cur = 0, cfg = -1;
    gemm_epi E;
    memset(&E, 0, sizeof E); /* nothing pending */
    const int64_t kb_n = A->kb_n, G = ES_GEMM_GROUP;
    int64_t mc = ES_GEMM_X_CHUNK / (A->k * 2);
    mc = mc < ES_GEMM_MIN_CHUNK ? ES_GEMM_MIN_CHUNK : mc;
    const int64_t n_chunks = (r1 - r0 + mc - 1) / mc;
    mc = ((r1 - r0 + n_chunks - 1) / n_chunks + 31) / 32 * 32; /* even chunks, tail only in the last */
    int64_t slots[ES_GEMM_PF_SLOTS];
    for (int64_t c0 = r0; c0 < r1; c0 += mc) {
        const int64_t c1 = c0 + mc < r1 ? c0 + mc : r1;
        /* The chunk's distinct slots, so each group can prefetch the member rows of the next one;
           slots beyond the bitmap or the cap are just not prefetched. */
        int64_t n_slots = 0;
        if (r > 0) {
            uint64_t seen[ES_GEMM_SLOT_BITS / 64];
            memset(seen, 0, sizeof seen);
            int64_t prev = -1;
            for (int64_t t = c0; t < c1 && n_slots < ES_GEMM_PF_SLOTS; t++) {
                const int64_t s = A->L->u_slot[t];
                if (s == prev || s < 0 || s >= ES_GEMM_SLOT_BITS) continue;
                prev = s;
                if (seen[s >> 6] >> (s & 63) & 1) continue;
                seen[s >> 6] |= (uint64_t)1 << (s & 63);
                slots[n_slots++] = s;
            }
        }
        for (int64_t g0 = np0; g0 < np1; g0 += G) {
            const int64_t g1 = g0 + G < np1 ? g0 + G : np1;
            int64_t ng0 = -1, ng1 = -1;
            if (g1 < np1) ng0 = g1, ng1 = g1 + G < np1 ? g1 + G : np1;
            else if (c1 < r1) ng0 = np0, ng1 = np0 + G < np1 ? np0 + G : np1;
            const int64_t nblk = (c1 - c0 + 31) / 32 * (g1 - g0);
            const char *pf = ng0 >= 0 ? (const char *)(A->P + ng0 * 2 * kb_n * 512) : NULL;
            const int64_t lines = ng0 >= 0 ? (ng1 - ng0) * kb_n * 32 : 0;
            const int64_t ppk = (lines + nblk * kb_n - 1) / (nblk * kb_n);
            /* member rows of the next group: per pair, both halves' slices (they differ only when a
               slice boundary falls mid-pair) */
            const uint16_t *ubase[2 * ES_GEMM_GROUP];
            int64_t ustride[2 * ES_GEMM_GROUP], halves = 0, ulines = 0, uq = 0;
            if (n_slots > 0 && ng0 >= 0) {
                for (int64_t p = ng0; p < ng1; p++)
                    for (int hf = 0; hf < 2; hf++) {
                        int64_t sl, ofs, sl0, ofs0;
                        gemm_slice_of(A->L, p * 32 + 16 * hf, &sl, &ofs);
                        if (hf == 1) {
                            gemm_slice_of(A->L, p * 32, &sl0, &ofs0);
                            if (sl0 == sl) continue;
                        }
                        ubase[halves] = (const uint16_t *)A->L->bt[sl] + ofs;
                        ustride[halves++] = A->L->widths[sl];
                    }
                ulines = n_slots * A->L->rank * halves;
                uq = (ulines + nblk - 1) / nblk;
            }
            int64_t bi = 0;
            for (int64_t m0 = c0; m0 < c1; m0 += 32) {
                const int rows = (int)(c1 - m0 < 32 ? c1 - m0 : 32);
                const int want = rows == 32 ? 32 : rows;
                if (want != cfg) {
                    gemm_tile_config(rows < 16 ? rows : 16, rows > 16 ? rows - 16 : 0);
                    cfg = want;
                }
                for (int64_t np = g0; np < g1; np++, bi++) {
                    const int64_t off = bi * kb_n * ppk;
                    const char *bpf = pf && off < lines ? pf + off * 64 : NULL;
                    const int64_t pf_n = bpf ? (lines - off < kb_n * ppk ? lines - off : kb_n * ppk) : 0;
                    if (uq) {
                        const int64_t q0 = bi * uq, q1 = q0 + uq < ulines ? q0 + uq : ulines;
                        if (q0 < q1) gemm_prefetch_members(A, slots, ubase, ustride, halves, q0, q1);
                    }
                    gemm_block(A, np, m0, rows, scratch[cur], &E, bpf, pf_n, ppk, r);
                    cur ^= 1;
                }
            }
        }
    }
    if (E.active) {
        gemm_ucache U;
        gemm_ucache_init(&U, r);
        for (int row = 0; row < E.rows; row++) gemm_epi_row_r(&E, &U, row, A, r);
    }
    _tile_release();
}

static void gemm_run(const gemm_args *A, int64_t np0, int64_t np1, int64_t r0, int64_t r1) {
    switch (A->L ? A->L->rank : 0) {
    case 0: gemm_run_r(A, np0, np1, r0, r1, 0); break;
    case 1: gemm_run_r(A, np0, np1, r0, r1, 1); break;
    case 2: gemm_run_r(A, np0, np1, r0, r1, 2); break;
    case 4: gemm_run_r(A, np0, np1, r0, r1, 4); break;
    case 8: gemm_run_r(A, np0, np1, r0, r1, 8); break;
    case 16: gemm_run_r(A, np0, np1, r0, r1, 16); break;
    default: gemm_run_r(A, np0, np1, r0, r1, A->L->rank); break;
    }
}

/* Splits the team over columns (whole pairs) unless rows balance better. */
static void gemm_thread(const gemm_args *shared, int tid, int nt) {
    /* a private copy: the original sits on the first thread's stack, next to lines it writes */
    const gemm_args args = *shared, *A = &args;
    const int64_t n_pairs = A->n / 32, m_blocks = (A->m + 31) / 32;
    if (nt <= 1) {
        gemm_run(A, 0, n_pairs, 0, A->m);
        return;
    }
    /* largest share over the mean share; columns win ties since each thread then reads only its
       own weights, which dominate traffic at decode sizes */
    const double col_imb = (double)((n_pairs + nt - 1) / nt) * nt / (double)n_pairs;
    const double row_imb = (double)((m_blocks + nt - 1) / nt) * nt / (double)m_blocks;
    if (col_imb <= row_imb * 1.05) {
        const int64_t p0 = n_pairs * tid / nt, p1 = n_pairs * (tid + 1) / nt;
        if (p0 < p1) gemm_run(A, p0, p1, 0, A->m);
    } else {
        const int64_t b0 = m_blocks * tid / nt, b1 = m_blocks * (tid + 1) / nt;
        const int64_t r0 = b0 * 32, r1 = b1 * 32 < A->m ? b1 * 32 : A->m;
        if (r0 < r1) gemm_run(A, 0, n_pairs, r0, r1);
    }
}

#endif /* ES_GEMM_AMX */

/* y = bf16(x W^T + bias + the member term), one rounding per output; see es_gemm_lora. x is (m x k) with
 * row stride x_stride, y (m x n_out) with row stride y_stride; nothing outside y's n_out columns is
 * written. The caller keeps u_slot within bt's slots. Returns the threads that ran, or -1 with nothing
 * written (unsupported shape or rank, widths not summing to n_out, or no AMX). Any split of the work
 * computes every output in the same order, so the result does not depend on `threads`. */
int es_gemm(const uint16_t *x, int64_t m, int64_t x_stride, const uint16_t *packed, int64_t n_out, int64_t k,
            const uint16_t *bias, uint16_t *y, int64_t y_stride, const es_gemm_lora *lora, int threads) {
#ifndef ES_GEMM_AMX
    (void)x; (void)m; (void)x_stride; (void)packed; (void)n_out; (void)k; (void)bias; (void)y; (void)y_stride;
    (void)lora; (void)threads;
    return -1;
#else
    if (!es_gemm_available() || !x || !packed || !y || m < 1 || es_gemm_packed_elems(n_out, k) < 0 ||
        x_stride < k || y_stride < n_out)
        return -1;
    if (lora) {
        if (lora->rank < 1 || lora->rank > ES_GEMM_MAX_RANK || lora->n_slices < 1 || !lora->widths || !lora->bt ||
            !lora->u_slot || !lora->h)
            return -1;
        int64_t sum = 0;
        for (int64_t s = 0; s < lora->n_slices; s++) {
            if (lora->widths[s] < 0 || lora->widths[s] % 16 || (lora->widths[s] > 0 && !lora->bt[s])) return -1;
            sum += lora->widths[s];
        }
        if (sum != n_out) return -1;
    }
    const gemm_args A = {x, packed, bias, y, m, x_stride, n_out, k, k / 32, y_stride, lora};
    int ran = 1;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int nt = omp_get_num_threads();
        if (omp_get_thread_num() == 0) ran = nt;
        gemm_thread(&A, omp_get_thread_num(), nt);
    }
#else
    gemm_thread(&A, 0, 1);
#endif
    return ran;
#endif
}
