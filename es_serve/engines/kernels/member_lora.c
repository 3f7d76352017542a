/* The LoRA step of a batch whose tokens each belong to one rank-r ES member.
 *
 * vLLM's CPU path gathers every token's A and B into fresh tensors and runs batched einsums, which
 * for rank 1 costs far more in copies and per-call overhead than in arithmetic. Here each token
 * reads its member's rows in place: r dot products of length `in`, then r axpys of length `out`,
 * written straight into the layer's output. Tokens with slot -1 carry no adapter and are skipped.
 * On CPUs with AVX-512 or AVX2 and FMA, ranks 1-4 and 8 in float32 and bfloat16 go through a
 * register-blocked path (a few tokens and rows at a time); other ranks, float16 and older CPUs take
 * the general loop.
 *
 * A is vLLM's stacked LoRA tensor, (slots, 1, max_rank, in); B is a transposed copy of its stacked
 * (slots, 1, out, max_rank) kept by the caller, cut to the rows any slot uses. All are contiguous,
 * in the same dtype as x and y (vLLM's lora_dtype defaults to the model dtype). y is
 * (tokens, y_stride) and slice k starts at column y_offset + sum of earlier widths.
 * Every product is summed in float32 and each output element is rounded once.
 *
 * Threads: tokens are grouped by member and the groups split over an OpenMP team. The library
 * needs libgomp.so.1, which torch's wheels bring under that name and load first, so the dynamic
 * linker hands back torch's runtime and the team is torch's own pool rather than a second one
 * competing for the same cores (member_kernel.py checks that no other runtime got mapped, and runs
 * serially if one did). The caller passes torch's thread count, and 1 for small batches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define ES_MAX_RANK 512
#define ES_BLOCK 256   /* outputs per block of B kept in L1 */
#define ES_GROUP 8     /* tokens of one member handled together */
#define ES_WIDE_RANK 8 /* ranks up to this widen B into a stack buffer of ES_WIDE_RANK x ES_BLOCK floats */
enum { ES_F32 = 0, ES_BF16 = 1, ES_F16 = 2 };

static inline float bf16_load(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even, as torch does */
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MAX__) && !defined(ES_NO_FLOAT16)
typedef _Float16 es_half;
static inline float f16_load(es_half v) { return (float)v; }
static inline es_half f16_store(float f) { return (es_half)f; }
#else
/* No _Float16 in this compiler: IEEE binary16 by hand (only the slow path of old toolchains). */
typedef uint16_t es_half;
static inline float f16_load(es_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {
        int e = -1;
        do { ++e; man <<= 1; } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline es_half f16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (es_half)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0));
    if (a >= 0x477ff000u) return (es_half)(sign | 0x7c00); /* rounds past the largest half */
    if (a < 0x38800000u) { /* subnormal half */
        if (a < 0x33000000u) return (es_half)sign;
        uint32_t man = (a & 0x7fffff) | 0x800000, shift = 126 - (a >> 23);
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        q += (rem > half) || (rem == half && (q & 1));
        return (es_half)(sign | q);
    }
    uint32_t q = a - 0x38000000u;
    q += 0xfffu + ((q >> 13) & 1u);
    return (es_half)(sign | (q >> 13));
}
#endif

/* Sixteen outputs at a time in one vector register: y += sum_r h[r] B^T[r], loaded and rounded once
 * (AVX-512). Each returns how many of the n outputs it did; the rest take the portable loop. */
#ifdef __AVX512F__
static inline __m512 bf16x16_load(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline void bf16x16_store(uint16_t *p, __m512 v) {
#ifdef __AVX512BF16__
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
#endif
}

static inline int64_t expand16_f32(float *yo, const float *b0, int64_t out, const float *h, int64_t rank,
                                   int64_t n) {
    int64_t o = 0;
    for (; o + 16 <= n; o += 16) {
        __m512 acc = _mm512_loadu_ps(yo + o);
        for (int64_t r = 0; r < rank; ++r)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(h[r]), _mm512_loadu_ps(b0 + r * out + o), acc);
        _mm512_storeu_ps(yo + o, acc);
    }
    return o;
}

static inline int64_t expand16_bf16(uint16_t *yo, const uint16_t *b0, int64_t out, const float *h, int64_t rank,
                                    int64_t n) {
    int64_t o = 0;
    for (; o + 16 <= n; o += 16) {
        __m512 acc = bf16x16_load(yo + o);
        for (int64_t r = 0; r < rank; ++r)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(h[r]), bf16x16_load(b0 + r * out + o), acc);
        bf16x16_store(yo + o, acc);
    }
    return o;
}

/* y (bf16) += sum_r h[r] B^T[r] with B already widened to float32 (ES_BLOCK floats per rank). */
static inline int64_t wide16_bf16(uint16_t *yo, const float *wide, const float *h, int64_t rank, int64_t n) {
    int64_t o = 0;
    __m512 hv[ES_WIDE_RANK]; /* broadcast once per token, not once per 16 outputs */
    for (int64_t r = 0; r < rank; ++r) hv[r] = _mm512_set1_ps(h[r]);
    for (; o + 16 <= n; o += 16) {
        __m512 acc = bf16x16_load(yo + o);
        for (int64_t r = 0; r < rank; ++r) acc = _mm512_fmadd_ps(hv[r], _mm512_loadu_ps(wide + r * ES_BLOCK + o), acc);
        bf16x16_store(yo + o, acc);
    }
    return o;
}
#else
#define expand16_f32(...) ((int64_t)0)
#define expand16_bf16(...) ((int64_t)0)
#define wide16_bf16(...) ((int64_t)0)
#endif
#define expand16_f16(...) ((int64_t)0)
#define wide16_f16(...) ((int64_t)0)
#define wide16_f32(...) ((int64_t)0)

/* Register-blocked path (AVX-512 with byte/word masks, or AVX2 with FMA): a unit's tokens go through in
 * small blocks whose member factors and per-token h sit in vector registers, so every load of A or B
 * serves several tokens and every token's chain of r multiply-adds overlaps with the other tokens'
 * chains. The loop-per-token shape below waited on one dependent chain at a time and ran at a fifth of
 * the core's multiply-add rate (measured on a decode-shaped batch, r = 4). Same sums in float32, same
 * order of the r terms per output, one rounding per output element. Block sizes keep accumulators and
 * broadcasts within the vector registers: 32 with AVX-512, 16 with AVX2.
 *
 * Each instruction set supplies the same primitives: es_vec holding ES_LANES floats, v_set1, v_zero,
 * v_fma, v_sum, and per dtype loads and stores of ES_LANES values (ld_, st_) and of the first n < ES_LANES
 * (ldn_, which reads the rest as zero, and stn_, which leaves the rest unwritten). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ES_BLOCKED 1
typedef __m512 es_vec;
#define ES_LANES 16
static inline es_vec v_set1(float f) { return _mm512_set1_ps(f); }
static inline es_vec v_zero(void) { return _mm512_setzero_ps(); }
static inline es_vec v_fma(es_vec a, es_vec b, es_vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(es_vec v) { return _mm512_reduce_add_ps(v); }
static inline __mmask16 es_tail16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

static inline es_vec ld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline es_vec ldn_f32(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(es_tail16(n), p); }
static inline void st_f32(float *p, es_vec v) { _mm512_storeu_ps(p, v); }
static inline void stn_f32(float *p, int64_t n, es_vec v) { _mm512_mask_storeu_ps(p, es_tail16(n), v); }

static inline es_vec widen16_bf16(__m256i w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}
static inline __m256i round16_bf16(es_vec v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
#endif
}
static inline es_vec ld_bf16(const uint16_t *p) { return widen16_bf16(_mm256_loadu_si256((const __m256i *)p)); }
static inline es_vec ldn_bf16(const uint16_t *p, int64_t n) {
    return widen16_bf16(_mm256_maskz_loadu_epi16(es_tail16(n), p));
}
static inline void st_bf16(uint16_t *p, es_vec v) { _mm256_storeu_si256((__m256i *)p, round16_bf16(v)); }
static inline void stn_bf16(uint16_t *p, int64_t n, es_vec v) {
    _mm256_mask_storeu_epi16(p, es_tail16(n), round16_bf16(v));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ES_BLOCKED 1
typedef __m256 es_vec;
#define ES_LANES 8
static inline es_vec v_set1(float f) { return _mm256_set1_ps(f); }
static inline es_vec v_zero(void) { return _mm256_setzero_ps(); }
static inline es_vec v_fma(es_vec a, es_vec b, es_vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float v_sum(es_vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256i es_tail8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline es_vec ld_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline es_vec ldn_f32(const float *p, int64_t n) { return _mm256_maskload_ps(p, es_tail8(n)); }
static inline void st_f32(float *p, es_vec v) { _mm256_storeu_ps(p, v); }
static inline void stn_f32(float *p, int64_t n, es_vec v) { _mm256_maskstore_ps(p, es_tail8(n), v); }

static inline es_vec widen8_bf16(__m128i w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
}
static inline __m128i round8_bf16(es_vec v) { /* as bf16_store: nearest, ties to even; NaN stays NaN */
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)); /* values fit 16 bits */
}
static inline es_vec ld_bf16(const uint16_t *p) { return widen8_bf16(_mm_loadu_si128((const __m128i *)p)); }
static inline es_vec ldn_bf16(const uint16_t *p, int64_t n) { /* no 16-bit masked loads in AVX2 */
    uint16_t t[8] = {0};
    memcpy(t, p, (size_t)n * sizeof(uint16_t));
    return ld_bf16(t);
}
static inline void st_bf16(uint16_t *p, es_vec v) { _mm_storeu_si128((__m128i *)p, round8_bf16(v)); }
static inline void stn_bf16(uint16_t *p, int64_t n, es_vec v) {
    uint16_t t[8];
    _mm_storeu_si128((__m128i *)t, round8_bf16(v));
    memcpy(p, t, (size_t)n * sizeof(uint16_t));
}
#endif

#ifdef ES_BLOCKED
#define ES_BLOCKED_RANK 8 /* ranks up to this take the blocked path (h is kept per token at this stride) */

/* y_j += sum_r h_j[r] B^T[r] for TJ tokens at a time: B's R vectors are loaded once per ES_LANES outputs
 * and used by every token of the block. */
#define ES_EXPAND_FN(NAME, T, SUF, R, TJ)                                                               \
    static inline void NAME(T *const *yr, const float *h, int64_t count, const T *bts, int64_t out) {   \
        for (int64_t j0 = 0; j0 < count; j0 += TJ) {                                                    \
            const int64_t nj = count - j0 < TJ ? count - j0 : TJ;                                       \
            es_vec hv[TJ][R];                                                                           \
            for (int j = 0; j < TJ; ++j)                                                                \
                for (int r = 0; r < R; ++r) hv[j][r] = v_set1(j < nj ? h[(j0 + j) * ES_BLOCKED_RANK + r] : 0.0f); \
            for (int64_t o = 0; o < out; o += ES_LANES) {                                               \
                const int64_t n = out - o;                                                              \
                const int full = n >= ES_LANES;                                                         \
                es_vec b[R], acc[TJ];                                                                   \
                for (int r = 0; r < R; ++r) b[r] = full ? ld_##SUF(bts + r * out + o) : ldn_##SUF(bts + r * out + o, n); \
                /* All loads of y before any store: rows a multiple of 4 KiB apart would otherwise  */  \
                /* make a load wait on the previous token's store to the same page offset.          */  \
                for (int j = 0; j < TJ; ++j)                                                            \
                    acc[j] = j >= nj ? v_zero() : full ? ld_##SUF(yr[j0 + j] + o) : ldn_##SUF(yr[j0 + j] + o, n); \
                for (int j = 0; j < TJ; ++j)                                                            \
                    for (int r = 0; r < R; ++r) acc[j] = v_fma(hv[j][r], b[r], acc[j]);                 \
                for (int j = 0; j < TJ; ++j)                                                            \
                    if (j < nj) {                                                                       \
                        if (full) st_##SUF(yr[j0 + j] + o, acc[j]);                                     \
                        else stn_##SUF(yr[j0 + j] + o, n, acc[j]);                                      \
                    }                                                                                   \
            }                                                                                           \
        }                                                                                               \
    }

/* h_j[r0 + r] = scale * <x_j, A[r0 + r]> for TJ tokens and RC rows at a time (TJ * RC accumulators):
 * each vector of A serves TJ tokens, each vector of x serves RC rows. Rows of a partial token block
 * repeat the block's first token and are discarded. STEP elements per step (DOTSTEP), the rest in
 * one masked step (DOTTAIL). */
#define ES_SHRINK_FN(NAME, T, STEP, DOTSTEP, DOTTAIL, RC, TJ)                                           \
    static inline void NAME(const T *const *xr, int64_t count, const T *a, int64_t in, float scale, float *h) { \
        for (int64_t j0 = 0; j0 < count; j0 += TJ) {                                                    \
            const int64_t nj = count - j0 < TJ ? count - j0 : TJ;                                       \
            const T *xs[TJ];                                                                            \
            for (int j = 0; j < TJ; ++j) xs[j] = xr[j0 + (j < nj ? j : 0)];                             \
            es_vec acc[TJ][RC];                                                                         \
            for (int j = 0; j < TJ; ++j)                                                                \
                for (int r = 0; r < RC; ++r) acc[j][r] = v_zero();                                      \
            int64_t i = 0;                                                                              \
            for (; i + STEP <= in; i += STEP) DOTSTEP(acc, xs, a, in, i, RC, TJ);                       \
            if (i < in) DOTTAIL(acc, xs, a, in, i, RC, TJ);                                             \
            for (int j = 0; j < nj; ++j)                                                                \
                for (int r = 0; r < RC; ++r) h[(j0 + j) * ES_BLOCKED_RANK + r] = v_sum(acc[j][r]) * scale; \
        }                                                                                               \
    }

/* One step of dot products from vectors of ES_LANES values widened to float32 (all float32, and bf16
 * without native bf16 pairs). */
#define ES_WIDE_STEP(SUF, acc, xs, a, in, i, RC, TJ)                                                    \
    do {                                                                                                \
        es_vec av[RC];                                                                                  \
        for (int r = 0; r < RC; ++r) av[r] = ld_##SUF(a + r * in + i);                                  \
        for (int j = 0; j < TJ; ++j) {                                                                  \
            const es_vec xv = ld_##SUF(xs[j] + i);                                                      \
            for (int r = 0; r < RC; ++r) acc[j][r] = v_fma(xv, av[r], acc[j][r]);                       \
        }                                                                                               \
    } while (0)
#define ES_WIDE_TAIL(SUF, acc, xs, a, in, i, RC, TJ)                                                    \
    do {                                                                                                \
        es_vec av[RC];                                                                                  \
        for (int r = 0; r < RC; ++r) av[r] = ldn_##SUF(a + r * in + i, in - i);                         \
        for (int j = 0; j < TJ; ++j) {                                                                  \
            const es_vec xv = ldn_##SUF(xs[j] + i, in - i);                                             \
            for (int r = 0; r < RC; ++r) acc[j][r] = v_fma(xv, av[r], acc[j][r]);                       \
        }                                                                                               \
    } while (0)
#define ES_F32_STEP(...) ES_WIDE_STEP(f32, __VA_ARGS__)
#define ES_F32_TAIL(...) ES_WIDE_TAIL(f32, __VA_ARGS__)
#ifdef __AVX512BF16__
/* Native bf16 pairs: 32 products per instruction, each summed in float32 (AVX-512 only). */
#define ES_BF16_STEP_N 32
#define ES_BF16_STEP(acc, xs, a, in, i, RC, TJ)                                                         \
    do {                                                                                                \
        __m512bh av[RC];                                                                                \
        for (int r = 0; r < RC; ++r) av[r] = (__m512bh)_mm512_loadu_si512((const void *)(a + r * in + i)); \
        for (int j = 0; j < TJ; ++j) {                                                                  \
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xs[j] + i));               \
            for (int r = 0; r < RC; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, av[r]);            \
        }                                                                                               \
    } while (0)
#define ES_BF16_TAIL(acc, xs, a, in, i, RC, TJ)                                                         \
    do {                                                                                                \
        const __mmask32 m = (__mmask32)((1ull << (in - i)) - 1);                                        \
        __m512bh av[RC];                                                                                \
        for (int r = 0; r < RC; ++r) av[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, (const void *)(a + r * in + i)); \
        for (int j = 0; j < TJ; ++j) {                                                                  \
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, (const void *)(xs[j] + i));      \
            for (int r = 0; r < RC; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, av[r]);            \
        }                                                                                               \
    } while (0)
#else
#define ES_BF16_STEP_N ES_LANES
#define ES_BF16_STEP(...) ES_WIDE_STEP(bf16, __VA_ARGS__)
#define ES_BF16_TAIL(...) ES_WIDE_TAIL(bf16, __VA_ARGS__)
#endif

/* Token blocks (TJ) per row count, sized to the register file. */
#if ES_LANES == 16
#define ES_TJ_1 8
#define ES_TJ_2 8
#define ES_TJ_3 4
#define ES_TJ_4 4
#define ES_TJ_8 2
#else
#define ES_TJ_1 4
#define ES_TJ_2 4
#define ES_TJ_3 2
#define ES_TJ_4 2
#define ES_TJ_8 1
#endif
ES_SHRINK_FN(shrink_f32_1, float, ES_LANES, ES_F32_STEP, ES_F32_TAIL, 1, ES_TJ_1)
ES_SHRINK_FN(shrink_f32_2, float, ES_LANES, ES_F32_STEP, ES_F32_TAIL, 2, ES_TJ_2)
ES_SHRINK_FN(shrink_f32_3, float, ES_LANES, ES_F32_STEP, ES_F32_TAIL, 3, ES_TJ_3)
ES_SHRINK_FN(shrink_f32_4, float, ES_LANES, ES_F32_STEP, ES_F32_TAIL, 4, ES_TJ_4)
ES_SHRINK_FN(shrink_bf16_1, uint16_t, ES_BF16_STEP_N, ES_BF16_STEP, ES_BF16_TAIL, 1, ES_TJ_1)
ES_SHRINK_FN(shrink_bf16_2, uint16_t, ES_BF16_STEP_N, ES_BF16_STEP, ES_BF16_TAIL, 2, ES_TJ_2)
ES_SHRINK_FN(shrink_bf16_3, uint16_t, ES_BF16_STEP_N, ES_BF16_STEP, ES_BF16_TAIL, 3, ES_TJ_3)
ES_SHRINK_FN(shrink_bf16_4, uint16_t, ES_BF16_STEP_N, ES_BF16_STEP, ES_BF16_TAIL, 4, ES_TJ_4)
ES_EXPAND_FN(expand_f32_1, float, f32, 1, ES_TJ_1)
ES_EXPAND_FN(expand_f32_2, float, f32, 2, ES_TJ_2)
ES_EXPAND_FN(expand_f32_3, float, f32, 3, ES_TJ_3)
ES_EXPAND_FN(expand_f32_4, float, f32, 4, ES_TJ_4)
ES_EXPAND_FN(expand_f32_8, float, f32, 8, ES_TJ_8)
ES_EXPAND_FN(expand_bf16_1, uint16_t, bf16, 1, ES_TJ_1)
ES_EXPAND_FN(expand_bf16_2, uint16_t, bf16, 2, ES_TJ_2)
ES_EXPAND_FN(expand_bf16_3, uint16_t, bf16, 3, ES_TJ_3)
ES_EXPAND_FN(expand_bf16_4, uint16_t, bf16, 4, ES_TJ_4)
ES_EXPAND_FN(expand_bf16_8, uint16_t, bf16, 8, ES_TJ_8)

/* One unit through the blocked path; returns 0 (nothing done) for ranks it has no block for. The
 * rank's rows of A go in chunks of up to four; the r terms of an output are added in rank order. */
#define ES_BLOCKED_FN(NAME, T, SUF)                                                                     \
    static int NAME(const T *x, const int64_t *tok, const unsigned char *neg, int64_t count, const T *as, \
                    const T *bts, int64_t in, int64_t rank, int64_t out, T *y, int64_t y_stride, float scale) { \
        if ((rank > 4 && rank != ES_BLOCKED_RANK) || count > ES_GROUP) return 0;                          \
        float h[ES_GROUP * ES_BLOCKED_RANK];                                                                \
        const T *xr[ES_GROUP];                                                                          \
        T *yr[ES_GROUP];                                                                                \
        for (int64_t j = 0; j < count; ++j) {                                                           \
            xr[j] = x + tok[j] * in;                                                                    \
            yr[j] = y + tok[j] * y_stride;                                                              \
        }                                                                                               \
        for (int64_t r0 = 0; r0 < rank; r0 += 4) {                                                      \
            const int64_t rc = rank - r0 < 4 ? rank - r0 : 4;                                           \
            const T *a0 = as + r0 * in;                                                                 \
            float *h0 = h + r0;                                                                         \
            if (rc == 1) shrink_##SUF##_1(xr, count, a0, in, scale, h0);                                \
            else if (rc == 2) shrink_##SUF##_2(xr, count, a0, in, scale, h0);                           \
            else if (rc == 3) shrink_##SUF##_3(xr, count, a0, in, scale, h0);                           \
            else shrink_##SUF##_4(xr, count, a0, in, scale, h0);                                        \
        }                                                                                               \
        if (neg)                                                                                        \
            for (int64_t j = 0; j < count; ++j)                                                         \
                if (neg[j])                                                                             \
                    for (int64_t r = 0; r < rank; ++r) h[j * ES_BLOCKED_RANK + r] = -h[j * ES_BLOCKED_RANK + r]; \
        switch (rank) {                                                                                 \
        case 1: expand_##SUF##_1(yr, h, count, bts, out); break;                                        \
        case 2: expand_##SUF##_2(yr, h, count, bts, out); break;                                        \
        case 3: expand_##SUF##_3(yr, h, count, bts, out); break;                                        \
        case 4: expand_##SUF##_4(yr, h, count, bts, out); break;                                        \
        default: expand_##SUF##_8(yr, h, count, bts, out); break;                                       \
        }                                                                                               \
        return 1;                                                                                       \
    }
ES_BLOCKED_FN(blocked_f32, float, f32)
ES_BLOCKED_FN(blocked_bf16, uint16_t, bf16)
#endif

/* A group of tokens of one member: h_j = scale * A_s x_j (rank r), then y_j += B_s h_j.
 * With `neg`, the group also holds tokens of the member's antithetic partner (neg[j] = 1), whose
 * slot holds the same A and B negated: h_j is negated instead, which gives the partner's bits
 * exactly (negation is exact and round-to-nearest is symmetric), and both read the rows once.
 * B arrives transposed, (rank, out) per slot, so the update is r contiguous axpys, and each block
 * of B is read once for the whole group while it sits in L1 (a decode batch has P tokens per
 * member; reading the member's rows once instead of P times keeps the kernel off the memory bus).
 * In bf16 and f16 the block is widened to float32 once per group, not once per token: the
 * per-token loop is then one load, one widening and one multiply-add per output (the part of a
 * decode step this kernel spends its time in). Each output element is rounded once. */
#define ES_GROUP_FN(NAME, T, LOAD, STORE, DOT, EXPAND16, WIDE16, BLOCKED)                                     \
    static void NAME(const T *x, const int64_t *tok, const unsigned char *neg, int64_t count, const T *as, \
                     const T *bts, int64_t in, int64_t rank, int64_t out, T *y, int64_t y_stride,      \
                     float scale) {                                                                    \
        if (BLOCKED(x, tok, neg, count, as, bts, in, rank, out, y, y_stride, scale)) return;            \
        float h[ES_GROUP][ES_MAX_RANK], acc[ES_BLOCK], wide[ES_WIDE_RANK * ES_BLOCK];                  \
        for (int64_t j = 0; j < count; ++j)                                                            \
            for (int64_t r = 0; r < rank; ++r) {                                                       \
                const float v = DOT(x + tok[j] * in, as + r * in, in) * scale;                         \
                h[j][r] = neg && neg[j] ? -v : v;                                                      \
            }                                                                                          \
        const int widen = sizeof(T) != sizeof(float) && count > 1 && rank <= ES_WIDE_RANK;             \
        for (int64_t o0 = 0; o0 < out; o0 += ES_BLOCK) {                                               \
            const int64_t n = out - o0 < ES_BLOCK ? out - o0 : ES_BLOCK;                               \
            if (widen)                                                                                 \
                for (int64_t r = 0; r < rank; ++r) {                                                   \
                    const T *br = bts + r * out + o0;                                                  \
                    _Pragma("omp simd") for (int64_t o = 0; o < n; ++o) wide[r * ES_BLOCK + o] = LOAD(br[o]); \
                }                                                                                      \
            for (int64_t j = 0; j < count; ++j) {                                                      \
                T *yo = y + tok[j] * y_stride + o0;                                                    \
                const int64_t done = widen ? WIDE16(yo, wide, h[j], rank, n) : EXPAND16(yo, bts + o0, out, h[j], rank, n); \
                if (done == n) continue;                                                               \
                _Pragma("omp simd") for (int64_t o = done; o < n; ++o) acc[o] = LOAD(yo[o]);           \
                for (int64_t r = 0; r < rank; ++r) {                                                   \
                    const float hr = h[j][r];                                                          \
                    if (widen) {                                                                       \
                        const float *br = wide + r * ES_BLOCK;                                         \
                        _Pragma("omp simd") for (int64_t o = done; o < n; ++o) acc[o] += hr * br[o];   \
                    } else {                                                                           \
                        const T *br = bts + r * out + o0;                                              \
                        _Pragma("omp simd") for (int64_t o = done; o < n; ++o) acc[o] += hr * LOAD(br[o]); \
                    }                                                                                  \
                }                                                                                      \
                _Pragma("omp simd") for (int64_t o = done; o < n; ++o) yo[o] = STORE(acc[o]);          \
            }                                                                                          \
        }                                                                                              \
    }

static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }

/* Dot products keep four vector accumulators: one would serialise every step on the latency of
 * the previous multiply-add (four to six cycles) instead of issuing one or two per cycle. */
static inline float dot_f32(const float *x, const float *a, int64_t n) {
#ifdef __AVX512F__
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(a + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(a + i + 16), acc1);
        acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(a + i + 32), acc2);
        acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(a + i + 48), acc3);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, a + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
#else
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * a[i];
    return acc;
#endif
}

static inline float dot_bf16(const uint16_t *x, const uint16_t *a, int64_t n) {
#ifdef __AVX512BF16__
    /* Native bf16 pairs: 32 products per instruction, each summed in float32. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t i = 0;
#define ES_DP(ACC, OFF)                                                                                 \
    ACC = _mm512_dpbf16_ps(ACC, (__m512bh)_mm512_loadu_si512((const void *)(x + i + OFF)),              \
                           (__m512bh)_mm512_loadu_si512((const void *)(a + i + OFF)))
    for (; i + 128 <= n; i += 128) {
        ES_DP(acc0, 0);
        ES_DP(acc1, 32);
        ES_DP(acc2, 64);
        ES_DP(acc3, 96);
    }
    for (; i + 32 <= n; i += 32) ES_DP(acc0, 0);
#undef ES_DP
    if (i < n) {
        __mmask32 m = (__mmask32)((1ull << (n - i)) - 1);
        __m512i xv = _mm512_maskz_loadu_epi16(m, (const void *)(x + i));
        __m512i av = _mm512_maskz_loadu_epi16(m, (const void *)(a + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)xv, (__m512bh)av);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
#else
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += bf16_load(x[i]) * bf16_load(a[i]);
    return acc;
#endif
}

static inline float dot_f16(const es_half *x, const es_half *a, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += f16_load(x[i]) * f16_load(a[i]);
    return acc;
}

#ifndef ES_BLOCKED
#define blocked_f32(...) 0
#define blocked_bf16(...) 0
#endif
#define blocked_f16(...) 0
ES_GROUP_FN(group_f32, float, f32_load, f32_store, dot_f32, expand16_f32, wide16_f32, blocked_f32)
ES_GROUP_FN(group_bf16, uint16_t, bf16_load, bf16_store, dot_bf16, expand16_bf16, wide16_bf16, blocked_bf16)
ES_GROUP_FN(group_f16, es_half, f16_load, f16_store, dot_f16, expand16_f16, wide16_f16, blocked_f16)

/* Which instruction path this build uses for bf16: lets the caller report what really ran. */
int es_member_lora_bf16_native(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* Whether tokens can be split over threads (built with OpenMP) or always run serially. */
int es_member_lora_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define ES_SLICES(T, GROUP, S, TOK, NEG, COUNT)                                                          \
    do {                                                                                                \
        int64_t offset = y_offset;                                                                      \
        for (int64_t k = 0; k < n_slices; ++k) {                                                        \
            const T *as = (const T *)a[k] + (S) * a_rows * in;                                          \
            const T *bs = (const T *)bt[k] + (S) * rank * widths[k];                                    \
            GROUP((const T *)x, TOK, NEG, COUNT, as, bs, in, rank, widths[k], (T *)y + offset, y_stride, scale); \
            offset += widths[k];                                                                        \
        }                                                                                               \
    } while (0)

#define ES_DISPATCH(S, TOK, NEG, COUNT)                                                                 \
    do {                                                                                                \
        if (dtype == ES_F32)                                                                            \
            ES_SLICES(float, group_f32, S, TOK, NEG, COUNT);                                            \
        else if (dtype == ES_BF16)                                                                      \
            ES_SLICES(uint16_t, group_bf16, S, TOK, NEG, COUNT);                                        \
        else                                                                                            \
            ES_SLICES(es_half, group_f16, S, TOK, NEG, COUNT);                                          \
    } while (0)

/* Brings the next unit's rows of A and B towards the core while this unit computes: between two
 * decode steps the whole model streams through the caches, so every member's rows arrive from
 * memory, and waiting for them one miss at a time was most of the kernel's time in an engine. */
static inline void prefetch_rows(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

/* Tokens grouped by slot (a counting sort): order[] lists the tokens slot by slot, and unit u covers
 * order[units[2u] .. units[2u + 1]), at most ES_GROUP tokens. With `canon` (n_slots entries, or NULL),
 * slot s is grouped under slot canon[s]: the slots of an antithetic pair share their groups, the
 * canonical slot's tokens first, so a unit may hold tokens of both. The grouping depends only on the
 * batch's slots, so an engine computes it once per step and every layer reuses it. Returns the number
 * of units, or -1 for a slot index past n_slots. order and units hold tokens and 2 * tokens entries. */
int64_t es_member_group(const int64_t *slots, int64_t tokens, int64_t n_slots, const int64_t *canon, int64_t *order,
                        int64_t *units) {
    const int64_t keys = 2 * n_slots; /* key 2c: slot c's own tokens; 2c + 1: its partner's */
    int64_t *start = calloc((size_t)keys + 1, sizeof(int64_t));
    int64_t *fill = malloc(((size_t)keys + 1) * sizeof(int64_t));
    int64_t n_units = -1;
    if (!start || !fill) goto done;
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s >= n_slots) goto done;
        if (s < 0) continue;
        const int64_t c = canon ? canon[s] : s;
        if (c < 0 || c >= n_slots) goto done;
        ++start[2 * c + (c != s) + 1];
    }
    for (int64_t k = 0; k < keys; ++k) start[k + 1] += start[k];
    memcpy(fill, start, (size_t)keys * sizeof(int64_t));
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        const int64_t c = canon ? canon[s] : s;
        order[fill[2 * c + (c != s)]++] = t;
    }
    n_units = 0;
    for (int64_t c = 0; c < n_slots; ++c)
        for (int64_t i = start[2 * c]; i < start[2 * c + 2]; i += ES_GROUP) {
            units[2 * n_units] = i;
            units[2 * n_units + 1] = start[2 * c + 2] < i + ES_GROUP ? start[2 * c + 2] : i + ES_GROUP;
            ++n_units;
        }
done:
    free(start);
    free(fill);
    return n_units;
}

/* One layer's stacked tensors, fixed for the engine's life (vLLM allocates them once); B^T and the
 * used rank change when adapters are written, and the caller updates them then. */
typedef struct {
    int64_t dtype, in, a_rows, n_slots, n_slices, rank;
    const void *const *a;
    const void *const *bt;
    const int64_t *widths;
    int64_t paired; /* every pair of the grouping's `canon` holds the same A and negated B in this layer */
    int64_t work;   /* multiply-adds per token, rank (in n_slices + sum of widths): decides the threads */
} es_layer;

/* One engine step's grouping (es_member_group) and threads, shared by every layer of the step. */
typedef struct {
    const int64_t *slots, *canon, *order, *units;
    int64_t n_units, tokens;
    int64_t min_work; /* calls with fewer multiply-adds (tokens x work) run on one thread */
    int64_t threads;
} es_step;

/* The rows the unit after u reads, when they are another slot's than unit u's (canonical slot c): A's, and
 * with `with_bt` B^T's. Units run in order on each thread, so these arrive while unit u computes. */
static inline void prefetch_next_unit(const es_layer *layer, const int64_t *slots, const int64_t *canon,
                                      const int64_t *order, const int64_t *units, int64_t n_units, int64_t u,
                                      int64_t c, int with_bt) {
    if (u + 1 >= n_units) return;
    const int64_t s1 = slots[order[units[2 * u + 2]]], next = canon ? canon[s1] : s1;
    if (next == c) return;
    const int64_t elem = layer->dtype == ES_F32 ? 4 : 2, in = layer->in, rank = layer->rank;
    for (int64_t k = 0; k < layer->n_slices; ++k) {
        prefetch_rows((const char *)layer->a[k] + next * layer->a_rows * in * elem, rank * in * elem);
        if (with_bt)
            prefetch_rows((const char *)layer->bt[k] + next * rank * layer->widths[k] * elem,
                          rank * layer->widths[k] * elem);
    }
}

/* All slices of one layer for the grouped tokens (es_member_group), the units split over `threads`.
 * A_k is (n_slots, a_rows, in) of which the first `rank` rows are used (vLLM pads every slot to its
 * max rank); B_k is given transposed, (n_slots, rank, width_k). `canon` is the grouping's (or NULL):
 * where the layer is `paired`, a unit reads its canonical slot's rows once for the tokens of both
 * members; otherwise each slot's tokens read their own. Returns the number of threads that ran, or
 * -1 for arguments it cannot take (nothing is written then). */
int es_member_lora_units(const es_layer *layer, const int64_t *slots, const int64_t *canon, const int64_t *order,
                         const int64_t *units, int64_t n_units, const void *x, void *y, int64_t y_stride,
                         int64_t y_offset, float scale, int threads) {
    const int64_t dtype = layer->dtype, in = layer->in, a_rows = layer->a_rows, n_slices = layer->n_slices;
    const int64_t rank = layer->rank, paired = layer->paired;
    const void *const *a = layer->a;
    const void *const *bt = layer->bt;
    const int64_t *widths = layer->widths;
    if (rank < 1 || rank > ES_MAX_RANK || rank > a_rows || dtype < ES_F32 || dtype > ES_F16) return -1;
    if (threads < 1) threads = 1;
    int team = 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t u = 0; u < n_units; ++u) {
#ifdef _OPENMP
        if (u == 0) team = omp_get_num_threads();
#endif
        const int64_t first = units[2 * u], s0 = slots[order[first]];
        const int64_t *tok = order + first, count = units[2 * u + 1] - first;
        const int64_t c = canon ? canon[s0] : s0;
        prefetch_next_unit(layer, slots, canon, order, units, n_units, u, c, 1);
        if (canon && paired) {
            unsigned char neg[ES_GROUP];
            for (int64_t j = 0; j < count; ++j) neg[j] = slots[tok[j]] != c;
            ES_DISPATCH(c, tok, neg, count);
        } else {
            /* Runs of one slot (a unit holds at most a pair's two, the canonical slot's first). */
            for (int64_t i = 0; i < count;) {
                const int64_t s = slots[tok[i]];
                int64_t j = i + 1;
                while (j < count && slots[tok[j]] == s) ++j;
                ES_DISPATCH(s, tok + i, (const unsigned char *)0, j - i);
                i = j;
            }
        }
    }
    return team;
}

/* The engine's per-layer call: es_member_lora_units with the step's grouping and threads read from
 * `step`, so the call converts six arguments instead of twelve (it runs once per layer and step, and
 * between two calls the layer's GEMM has pushed the interpreter's state out of the caches). */
int es_member_lora_step(const es_layer *layer, const es_step *step, const void *x, void *y, int64_t y_stride,
                        float scale) {
    const int threads = step->tokens * layer->work < step->min_work ? 1 : (int)step->threads;
    return es_member_lora_units(layer, step->slots, step->canon, step->order, step->units, step->n_units, x, y,
                                y_stride, 0, scale, threads);
}

/* The first half of the member term for the fused GEMM (member_gemm.c), which adds the second half
 * to its float32 accumulators before its one rounding: per token and slice, h = scale A_s x (the
 * minus member of a claimed pair negated, as es_member_lora_units does), and the slot whose rows of
 * B^T the GEMM's epilogue reads (the pair's canonical slot where the layer is paired). Tokens without
 * a member get u_slot -1. h is (tokens, n_slices, rank). bfloat16 only: the fused GEMM is AMX's, and
 * every CPU with AMX has native bf16 dot products. Returns the threads that ran, or -1 (nothing written). */
int es_member_shrink_step(const es_layer *layer, const es_step *step, const void *x, float scale, float *h,
                          int64_t *u_slot) {
    const int64_t in = layer->in, a_rows = layer->a_rows, n_slices = layer->n_slices, rank = layer->rank;
    if (layer->dtype != ES_BF16 || rank < 1 || rank > ES_MAX_RANK || rank > a_rows) return -1;
    const int64_t *slots = step->slots, *canon = step->canon, *order = step->order, *units = step->units;
    const int64_t n_units = step->n_units, paired = canon && layer->paired;
    for (int64_t t = 0; t < step->tokens; ++t) u_slot[t] = -1;
    int threads = step->tokens * rank * in * n_slices < step->min_work ? 1 : (int)step->threads;
    if (threads < 1) threads = 1;
    int team = 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t u = 0; u < n_units; ++u) {
#ifdef _OPENMP
        if (u == 0) team = omp_get_num_threads();
#endif
        const int64_t first = units[2 * u], count = units[2 * u + 1] - first;
        const int64_t *tok = order + first;
        const int64_t c = canon ? canon[slots[tok[0]]] : slots[tok[0]];
        prefetch_next_unit(layer, slots, canon, order, units, n_units, u, c, 0); /* A only: the GEMM reads B^T */
        /* Runs of tokens that read one slot's A: the whole unit where the layer is paired. */
        for (int64_t i = 0; i < count;) {
            const int64_t s = paired ? c : slots[tok[i]];
            int64_t j = i + 1;
            while (j < count && (paired || slots[tok[j]] == s)) ++j;
            const uint16_t *xr[ES_GROUP];
            for (int64_t q = i; q < j; ++q) {
                xr[q - i] = (const uint16_t *)x + tok[q] * in;
                u_slot[tok[q]] = s;
            }
            for (int64_t k = 0; k < n_slices; ++k) {
                const uint16_t *as = (const uint16_t *)layer->a[k] + s * a_rows * in;
#ifdef ES_BLOCKED
                if (rank <= ES_BLOCKED_RANK) {
                    float hb[ES_GROUP * ES_BLOCKED_RANK];
                    for (int64_t r0 = 0; r0 < rank; r0 += 4) {
                        const int64_t rc = rank - r0 < 4 ? rank - r0 : 4;
                        if (rc == 1) shrink_bf16_1(xr, j - i, as + r0 * in, in, scale, hb + r0);
                        else if (rc == 2) shrink_bf16_2(xr, j - i, as + r0 * in, in, scale, hb + r0);
                        else if (rc == 3) shrink_bf16_3(xr, j - i, as + r0 * in, in, scale, hb + r0);
                        else shrink_bf16_4(xr, j - i, as + r0 * in, in, scale, hb + r0);
                    }
                    for (int64_t q = i; q < j; ++q) {
                        float *ht = h + (tok[q] * n_slices + k) * rank;
                        const int neg = paired && slots[tok[q]] != c;
                        for (int64_t r = 0; r < rank; ++r) ht[r] = neg ? -hb[(q - i) * ES_BLOCKED_RANK + r] : hb[(q - i) * ES_BLOCKED_RANK + r];
                    }
                    continue;
                }
#endif
                for (int64_t q = i; q < j; ++q) {
                    float *ht = h + (tok[q] * n_slices + k) * rank;
                    const int neg = paired && slots[tok[q]] != c;
                    for (int64_t r = 0; r < rank; ++r) {
                        const float v = dot_bf16(xr[q - i], as + r * in, in) * scale;
                        ht[r] = neg ? -v : v;
                    }
                }
            }
            i = j;
        }
    }
    return team;
}

/* Grouping and layer in one call, for callers without a per-step plan (tests, one-off calls). */
int es_member_lora(int dtype, const void *x, int64_t tokens, int64_t in, const void *const *a, int64_t a_rows,
                   int64_t n_slots, const void *const *bt, const int64_t *widths, int64_t n_slices, int64_t rank,
                   void *y, int64_t y_stride, int64_t y_offset, const int64_t *slots, float scale, int threads) {
    if (rank < 1 || rank > ES_MAX_RANK || rank > a_rows || dtype < ES_F32 || dtype > ES_F16) return -1;
    if (tokens <= 0) return 1;
    int64_t *order = malloc((size_t)tokens * sizeof(int64_t));
    int64_t *units = malloc(2 * (size_t)tokens * sizeof(int64_t));
    int rc = -1;
    if (order && units) {
        const int64_t n_units = es_member_group(slots, tokens, n_slots, (const int64_t *)0, order, units);
        if (n_units >= 0) {
            const es_layer layer = {dtype, in, a_rows, n_slots, n_slices, rank, a, bt, widths, 0, 0};
            rc = es_member_lora_units(&layer, slots, (const int64_t *)0, order, units, n_units, x, y, y_stride,
                                      y_offset, scale, threads);
        }
    }
    free(order);
    free(units);
    return rc;
}

/* What a layer's plan re-reads after vLLM wrote its slots (once per layer and generation), here in C
 * because the torch version (a temporary the size of A for the scan, a strided transpose copy for B)
 * cost about 1 % of a member generation at r = 4, in the engine step that follows the writes. */

/* One past the highest row of A that holds a nonzero value in any slot and slice (0: all zero), scanning
 * from the top: vLLM pads every slot to its max rank with zero rows, so those are read once and the
 * first used row stops the scan. A value is zero when its bits other than the sign are (+0 and -0). */
int64_t es_used_rank(const void *const *a, int64_t n_slices, int64_t n_slots, int64_t a_rows, int64_t in,
                     int64_t elem) {
    const uint64_t mask = elem == 4 ? 0x7fffffff7fffffffull : 0x7fff7fff7fff7fffull;
    const int64_t bytes = in * elem, words = bytes / 8;
    for (int64_t row = a_rows - 1; row >= 0; --row)
        for (int64_t k = 0; k < n_slices; ++k)
            for (int64_t s = 0; s < n_slots; ++s) {
                const unsigned char *p = (const unsigned char *)a[k] + (s * a_rows + row) * bytes;
                uint64_t any = 0;
                for (int64_t w = 0; w < words; ++w) {
                    uint64_t v;
                    memcpy(&v, p + 8 * w, 8);
                    any |= v & mask;
                }
                for (int64_t i = words * 8; i < bytes; i += elem) { /* rows whose length is not a multiple of 8 bytes */
                    uint32_t v = 0;
                    memcpy(&v, p + i, (size_t)elem);
                    any |= v & (elem == 4 ? 0x7fffffffu : 0x7fffu);
                }
                if (any) return row + 1;
            }
    return 0;
}

/* B transposed for the kernel: bt[k] (n_slots, rank, width_k) from vLLM's b[k] (n_slots, 1, width_k, b_rows),
 * the first `rank` columns. Slots split over `threads`. */
void es_transpose_b(const void *const *b, void *const *bt, const int64_t *widths, int64_t n_slices, int64_t n_slots,
                    int64_t b_rows, int64_t rank, int64_t elem, int threads) {
    if (threads < 1) threads = 1;
    for (int64_t k = 0; k < n_slices; ++k) {
        const int64_t w = widths[k];
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t s = 0; s < n_slots; ++s) {
            if (elem == 4) {
                const uint32_t *src = (const uint32_t *)b[k] + s * w * b_rows;
                uint32_t *dst = (uint32_t *)bt[k] + s * rank * w;
                for (int64_t o = 0; o < w; ++o)
                    for (int64_t r = 0; r < rank; ++r) dst[r * w + o] = src[o * b_rows + r];
            } else {
                const uint16_t *src = (const uint16_t *)b[k] + s * w * b_rows;
                uint16_t *dst = (uint16_t *)bt[k] + s * rank * w;
                for (int64_t o = 0; o < w; ++o)
                    for (int64_t r = 0; r < rank; ++r) dst[r * w + o] = src[o * b_rows + r];
            }
        }
    }
}

/* The worker's writes of a generation's members into vLLM's slots (vllm_worker.py), in C for the same
 * reason as the plan's re-read above: torch stacked every member's tensors into a temporary before its
 * indexed copy, and copied B's rows (r of R values each) element by element through strided views. */

/* Adapters into slots of a stacked LoRA tensor (slots, 1, slot_rows, slot_cols), contiguous: for each
 * entry, the (rows, cols) contiguous source goes to the slot's top-left corner and the rest of the slot
 * is zeroed, as vLLM's reset_lora then set_lora leave it. Entries split over `threads`. */
void es_write_slots(void *stacked, int64_t slot_rows, int64_t slot_cols, const int64_t *slots,
                    const void *const *sources, int64_t count, int64_t rows, int64_t cols, int64_t elem,
                    int threads) {
    if (threads < 1) threads = 1;
    if (elem != 2 && elem != 4) return;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t e = 0; e < count; ++e) {
        char *dst = (char *)stacked + slots[e] * slot_rows * slot_cols * elem;
        const char *src = (const char *)sources[e];
        if (cols == slot_cols) {
            memcpy(dst, src, (size_t)(rows * cols * elem));
        } else if ((cols * elem) % 8 == 0 && (slot_cols * elem) % 8 == 0) {
            /* B's rows are r of R values (4 of 8 at rank 4): whole 8-byte words, not a library call per row */
            const int64_t cw = cols * elem / 8, sw = slot_cols * elem / 8;
            const uint64_t zero = 0;
            for (int64_t i = 0; i < rows; ++i) { /* memcpy of 8 bytes: one move, with no alignment assumed */
                for (int64_t j = 0; j < cw; ++j) memcpy(dst + (i * sw + j) * 8, src + (i * cw + j) * 8, 8);
                for (int64_t j = cw; j < sw; ++j) memcpy(dst + (i * sw + j) * 8, &zero, 8);
            }
        } else if (elem == 2) {
            uint16_t *o = (uint16_t *)dst;
            const uint16_t *in = (const uint16_t *)src;
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < slot_cols; ++j) o[i * slot_cols + j] = j < cols ? in[i * cols + j] : 0;
        } else {
            uint32_t *o = (uint32_t *)dst;
            const uint32_t *in = (const uint32_t *)src;
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < slot_cols; ++j) o[i * slot_cols + j] = j < cols ? in[i * cols + j] : 0;
        }
        memset(dst + rows * slot_cols * elem, 0, (size_t)((slot_rows - rows) * slot_cols * elem));
    }
}

/* A generation's members straight from their float32 draws into vLLM's slots (vllm_worker.py), for slots
 * that stay with one adapter id from one generation to the next: the drawn block is read once, scaled,
 * rounded and transposed on the way, with no per-member tensors and no registration in between.
 *
 * Job j (8 int64 each: stacked address, slot rows, slot cols, rows, cols, source row step, source column
 * step, source offset; then the side, 0 for A and 1 for B) and member e (slot, address of its draw's float32
 * row, the coefficients of A's and B's side): slot (rows, cols) element (i, j) = round(src[off + i rs + j cs]
 * * coeff) and the rest of the slot zero, as vLLM's reset_lora then set_lora leave it. One float32 multiply
 * (nothing to fuse it with) then the dtype's rounding, so the bits are torch's `(z * c).to(dtype)`; a minus
 * member's negative coefficient gives exactly the negation of its partner's rounded value. */
enum { ES_JOB_FIELDS = 9 };
void es_write_drawn_slots(const int64_t *jobs, int64_t n_jobs, int dtype, const int64_t *slots, const int64_t *rows_at,
                          const float *coeff_a, const float *coeff_b, int64_t count, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic, 4) if (threads > 1)
    for (int64_t j = 0; j < n_jobs; ++j) {
        for (int64_t e = 0; e < count; ++e) {
            const int64_t *job = jobs + j * ES_JOB_FIELDS;
            const int64_t slot_rows = job[1], slot_cols = job[2], rows = job[3], cols = job[4];
            const int64_t rs = job[5], cs = job[6], side = job[8];
            const float *src = (const float *)(intptr_t)rows_at[e] + job[7];
            const float c = side ? coeff_b[e] : coeff_a[e];
            const int64_t at = slots[e] * slot_rows * slot_cols;
            if (dtype == ES_F32) {
                float *o = (float *)(intptr_t)job[0] + at;
                for (int64_t i = 0; i < rows; ++i) {
                    for (int64_t k = 0; k < cols; ++k) o[i * slot_cols + k] = src[i * rs + k * cs] * c;
                    for (int64_t k = cols; k < slot_cols; ++k) o[i * slot_cols + k] = 0.0f;
                }
                memset(o + rows * slot_cols, 0, (size_t)((slot_rows - rows) * slot_cols) * 4);
            } else if (dtype == ES_BF16) {
                uint16_t *o = (uint16_t *)(intptr_t)job[0] + at;
                for (int64_t i = 0; i < rows; ++i) {
                    for (int64_t k = 0; k < cols; ++k) o[i * slot_cols + k] = bf16_store(src[i * rs + k * cs] * c);
                    for (int64_t k = cols; k < slot_cols; ++k) o[i * slot_cols + k] = 0;
                }
                memset(o + rows * slot_cols, 0, (size_t)((slot_rows - rows) * slot_cols) * 2);
            } else {
                es_half *o = (es_half *)(intptr_t)job[0] + at;
                for (int64_t i = 0; i < rows; ++i) {
                    for (int64_t k = 0; k < cols; ++k) o[i * slot_cols + k] = f16_store(src[i * rs + k * cs] * c);
                    for (int64_t k = cols; k < slot_cols; ++k) o[i * slot_cols + k] = f16_store(0.0f);
                }
                memset(o + rows * slot_cols, 0, (size_t)((slot_rows - rows) * slot_cols) * 2);
            }
        }
    }
}

/* The trained layers' own GEMM with the member term in its epilogue (AMX only): one library, so it
 * shares the OpenMP team and the cache key, and reads the shrink's h from es_member_shrink_step. */
#include "member_gemm.c"
