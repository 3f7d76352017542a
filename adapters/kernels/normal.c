/* The fast path of es-serve's platform-exact normal generator (adapters/normal.py holds the same
 * algorithm in numpy, the slow path and the tables).
 *
 * Integer arithmetic modulo 2^64 and one double multiply rounded to float: nothing here can differ
 * between IEEE-754 machines or compilers (build with -ffp-contract=off; there is no add to fuse). */
#include <stdint.h>

#define GAMMA 0x9E3779B97F4A7C15ULL

static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Stream r fills lengths[r] floats of out, right after stream r - 1's: word j of a stream is
 * mix(starts[r] + (j + 1) GAMMA); its low 9 bits pick a signed layer, its top 53 bits the position.
 * Draws outside their layer's core go to `rejects` (flat indices into out, at most `capacity` of
 * them) and are finished by the caller; returns how many there were. */
int64_t es_normal_fast(const uint64_t *starts, const int64_t *lengths, int64_t rows, const int64_t *core,
                       const double *width, float *out, int64_t *rejects, int64_t capacity) {
    int64_t count = 0, offset = 0;
    for (int64_t r = 0; r < rows; r++) {
        uint64_t x = starts[r];
        int64_t len = lengths[r];
        float *o = out + offset;
        for (int64_t j = 0; j < len; j++) {
            x += GAMMA;
            uint64_t z = mix(x);
            uint64_t idx = z & 511u;
            int64_t m = (int64_t)(z >> 11);
            if (m >= core[idx]) {
                if (count < capacity) rejects[count] = offset + j;
                count++;
            }
            o[j] = (float)((double)m * width[idx]);
        }
        offset += len;
    }
    return count;
}

/* The slow path: the same operations in the same order as `_slow`, `exp_neg` and `log_unit` in
 * adapters/normal.py (see there for the algorithm and the error analysis). floor, frexp and ldexp
 * are exact in every C library. */
#include <math.h>

#define ATTEMPT (1ULL << 40)
#define R 3.6541528853610088
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define INV_LN2 1.44269504088896338700e00
#define SQRT_HALF 0.70710678118654752440

static inline uint64_t word(uint64_t start, uint64_t counter) { return mix(start + counter * GAMMA); }

static inline double uniform(uint64_t w) { return ((double)(int64_t)(w >> 12) * 2.0 + 1.0) * 0x1p-53; }

static double exp_neg(double t, const double *exp_coeffs) {
    double k = floor(t * INV_LN2 + 0.5);
    double s = (t - k * LN2_HI) - k * LN2_LO;
    double p = exp_coeffs[0];
    for (int i = 1; i < 14; i++) p = p * s + exp_coeffs[i];
    return ldexp(p, (int)k);
}

static double log_unit(double u, const double *log_coeffs) {
    int e;
    double f = frexp(u, &e);
    if (f < SQRT_HALF) {
        f = f * 2.0;
        e = e - 1;
    }
    double ed = (double)e;
    double s = (f - 1.0) / (f + 1.0);
    double z = s * s;
    double p = log_coeffs[0];
    for (int i = 1; i < 12; i++) p = p * z + log_coeffs[i];
    double log_f = (s * 2.0) * p;
    return ed * LN2_HI + (log_f + ed * LN2_LO);
}

void es_normal_slow(const uint64_t *starts, const int64_t *positions, int64_t n, const int64_t *core,
                    const double *scale, const double *f, const double *df, const double *exp_coeffs,
                    const double *log_coeffs, double *result) {
    for (int64_t e = 0; e < n; e++) {
        uint64_t s = starts[e], p = (uint64_t)positions[e] + 1;
        uint64_t w = word(s, p);
        int sign = (int)((w >> 8) & 1);
        int64_t layer = (int64_t)(w & 255);
        double m = (double)(int64_t)(w >> 11);
        double value;
        for (uint64_t a = 1;; a++) {
            double x = m * scale[layer];
            uint64_t wa = word(s, p + (3 * a - 2) * ATTEMPT);
            if (layer != 0) {
                double y = f[layer] + uniform(wa) * df[layer];
                if (y < exp_neg((x * x) * -0.5, exp_coeffs)) {
                    value = x;
                    break;
                }
                uint64_t fresh = word(s, p + 3 * a * ATTEMPT);
                int64_t new_layer = (int64_t)(fresh & 255);
                int64_t new_m = (int64_t)(fresh >> 11);
                if (new_m < core[new_layer]) {
                    value = (double)new_m * scale[new_layer];
                    break;
                }
                layer = new_layer;
                m = (double)new_m;
            } else {
                uint64_t wb = word(s, p + (3 * a - 1) * ATTEMPT);
                double dx = -log_unit(uniform(wa), log_coeffs) / R;
                double dy = -log_unit(uniform(wb), log_coeffs);
                if (dy + dy > dx * dx) {
                    value = dx + R;
                    break;
                }
            }
        }
        result[e] = sign ? -value : value;
    }
}
