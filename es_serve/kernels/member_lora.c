/* The LoRA step of a batch whose tokens each belong to one rank-r ES member.
 *
 * vLLM's CPU path gathers every token's A and B into fresh tensors and runs batched einsums, which
 * for rank 1 costs far more in copies and per-call overhead than in arithmetic. Here each token
 * reads its member's rows in place: r dot products of length `in`, then r axpys of length `out`,
 * written straight into the layer's output. Tokens with slot -1 carry no adapter and are skipped.
 *
 * Layouts are vLLM's stacked LoRA tensors: A is (slots, 1, max_rank, in), B is (slots, 1, out,
 * max_rank), both contiguous float32. y is (tokens, y_stride) and this slice starts at y_offset.
 */
#include <stdint.h>

void es_member_lora(const float *x, int64_t tokens, int64_t in, const float *a, const float *b,
                    int64_t max_rank, int64_t out, float *y, int64_t y_stride, int64_t y_offset,
                    const int64_t *slots, float scale) {
    float h[512];
    if (max_rank > 512) return; /* vLLM caps max_lora_rank at 512; the caller checks too */
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        const float *xt = x + t * in;
        const float *as = a + s * max_rank * in;
        for (int64_t r = 0; r < max_rank; ++r) {
            const float *ar = as + r * in;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < in; ++i) acc += xt[i] * ar[i];
            h[r] = acc * scale;
        }
        const float *bs = b + s * out * max_rank;
        float *yt = y + t * y_stride + y_offset;
        if (max_rank == 1) {
            const float h0 = h[0];
#pragma omp simd
            for (int64_t o = 0; o < out; ++o) yt[o] += h0 * bs[o];
        } else {
            for (int64_t o = 0; o < out; ++o) {
                const float *bo = bs + o * max_rank;
                float acc = 0.0f;
                for (int64_t r = 0; r < max_rank; ++r) acc += bo[r] * h[r];
                yt[o] += acc;
            }
        }
    }
}
