/* The LoRA step of a batch whose tokens each belong to one rank-r ES member.
 *
 * vLLM's CPU path gathers every token's A and B into fresh tensors and runs batched einsums, which
 * for rank 1 costs far more in copies and per-call overhead than in arithmetic. Here each token
 * reads its member's rows in place: r dot products of length `in`, then r axpys of length `out`,
 * written straight into the layer's output. Tokens with slot -1 carry no adapter and are skipped.
 *
 * Layouts are vLLM's stacked LoRA tensors: A is (slots, 1, max_rank, in), B is (slots, 1, out,
 * max_rank), both contiguous, in the same dtype as x and y (vLLM's lora_dtype defaults to the model
 * dtype). y is (tokens, y_stride) and slice k starts at column y_offset + sum of earlier widths.
 * Every product is summed in float32 and each output element is rounded once.
 *
 * Threads: tokens are split over an OpenMP team. The library is linked against libgomp.so.1, the
 * runtime torch already loaded, so the team is torch's own pool rather than a second one competing
 * for the same cores; the caller passes torch's thread count and 1 for small batches.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define ES_MAX_RANK 512
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

/* One token: h = scale * A_s x (rank r), then y += B_s h, per dtype T with load/store to float. */
#define ES_TOKEN(NAME, T, LOAD, STORE, DOT)                                                             \
    static void NAME(const T *xt, const T *as, const T *bs, int64_t in, int64_t rank, int64_t out,     \
                     T *yt, float scale) {                                                             \
        float h[ES_MAX_RANK];                                                                          \
        for (int64_t r = 0; r < rank; ++r) h[r] = DOT(xt, as + r * in, in) * scale;                    \
        if (rank == 1) {                                                                               \
            const float h0 = h[0];                                                                     \
            _Pragma("omp simd") for (int64_t o = 0; o < out; ++o) yt[o] = STORE(LOAD(yt[o]) + h0 * LOAD(bs[o])); \
        } else if (rank == 8) {                                                                        \
            /* vLLM pads ranks 2..8 to 8: a fixed trip count lets the compiler unroll the r loop. */ \
            for (int64_t o = 0; o < out; ++o) {                                                        \
                const T *bo = bs + o * 8;                                                              \
                float acc = 0.0f;                                                                      \
                _Pragma("GCC unroll 8") for (int r = 0; r < 8; ++r) acc += LOAD(bo[r]) * h[r];         \
                yt[o] = STORE(LOAD(yt[o]) + acc);                                                      \
            }                                                                                          \
        } else {                                                                                       \
            for (int64_t o = 0; o < out; ++o) {                                                        \
                const T *bo = bs + o * rank;                                                           \
                float acc = 0.0f;                                                                      \
                for (int64_t r = 0; r < rank; ++r) acc += LOAD(bo[r]) * h[r];                          \
                yt[o] = STORE(LOAD(yt[o]) + acc);                                                      \
            }                                                                                          \
        }                                                                                              \
    }

static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }

static inline float dot_f32(const float *x, const float *a, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * a[i];
    return acc;
}

static inline float dot_bf16(const uint16_t *x, const uint16_t *a, int64_t n) {
#ifdef __AVX512BF16__
    /* Native bf16 pairs: 32 products per instruction, each summed in float32. */
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i xv = _mm512_loadu_si512((const void *)(x + i));
        __m512i av = _mm512_loadu_si512((const void *)(a + i));
        acc = _mm512_dpbf16_ps(acc, (__m512bh)xv, (__m512bh)av);
    }
    if (i < n) {
        __mmask32 m = (__mmask32)((1ull << (n - i)) - 1);
        __m512i xv = _mm512_maskz_loadu_epi16(m, (const void *)(x + i));
        __m512i av = _mm512_maskz_loadu_epi16(m, (const void *)(a + i));
        acc = _mm512_dpbf16_ps(acc, (__m512bh)xv, (__m512bh)av);
    }
    return _mm512_reduce_add_ps(acc);
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

ES_TOKEN(token_f32, float, f32_load, f32_store, dot_f32)
ES_TOKEN(token_bf16, uint16_t, bf16_load, bf16_store, dot_bf16)
ES_TOKEN(token_f16, es_half, f16_load, f16_store, dot_f16)

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

#define ES_SLICES(T, TOKEN)                                                                             \
    do {                                                                                                \
        const T *xt = (const T *)x + t * in;                                                            \
        int64_t offset = y_offset;                                                                      \
        for (int64_t k = 0; k < n_slices; ++k) {                                                        \
            const T *as = (const T *)a[k] + s * rank * in;                                              \
            const T *bs = (const T *)b[k] + s * widths[k] * rank;                                       \
            TOKEN(xt, as, bs, in, rank, widths[k], (T *)y + t * y_stride + offset, scale);              \
            offset += widths[k];                                                                        \
        }                                                                                               \
    } while (0)

/* All slices of one layer for every token. Returns the number of threads that ran, or -1 for
 * arguments it cannot take. */
int es_member_lora(int dtype, const void *x, int64_t tokens, int64_t in, const void *const *a,
                   const void *const *b, const int64_t *widths, int64_t n_slices, int64_t rank, void *y,
                   int64_t y_stride, int64_t y_offset, const int64_t *slots, float scale, int threads) {
    if (rank < 1 || rank > ES_MAX_RANK || dtype < ES_F32 || dtype > ES_F16) return -1;
    if (threads < 1) threads = 1;
    int team = 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tokens; ++t) {
#ifdef _OPENMP
        if (t == 0) team = omp_get_num_threads();
#endif
        const int64_t s = slots[t];
        if (s < 0) continue;
        if (dtype == ES_F32)
            ES_SLICES(float, token_f32);
        else if (dtype == ES_BF16)
            ES_SLICES(uint16_t, token_bf16);
        else
            ES_SLICES(es_half, token_f16);
    }
    return team;
}
