/* GPTQ's in-block column loop (methods/gptq_solver.py, int format, CPU): the float32 operations of its numpy
 * loop, in the same order, so the results are bit-identical to it (and to the reference implementation).
 * Build without FMA contraction (-ffp-contract=off) and without fast-math: every product is rounded before the
 * subtraction that uses it, as numpy's separate multiply and subtract do. rintf rounds half to even in the
 * default rounding mode, as np.rint. */
#include <math.h>
#include <stdint.h>

/* Quantize columns a..e-1 of a block (rows of the transposed block WT [b, out], row stride `out`):
 *   q = clamp(rint(w / s) + z, 0, maxq);  err = (w - (q - z) * s) / d_i
 * QT / ET receive q and err; the rows i+1..b-1 of WT get the rank-1 update WT[j] -= H1[i, j] * err.
 * s, z: the group's scale and zero per output row (stride 1) or one for all (stride 0); H1: the block's part of the
 * inverse-Hessian factor, element (i, j) at H1[i * h0 + j * h1] (it may be a transposed view). */
void qr_gptq_columns(float *WT, float *QT, float *ET, const float *H1, int64_t h0, int64_t h1, const float *s,
                     int64_t ss, const float *z, int64_t zs, int64_t out, int64_t b, int64_t a, int64_t e,
                     float maxq) {
    for (int64_t i = a; i < e; i++) {
        const float *w = WT + i * out;
        float *q = QT + i * out, *err = ET + i * out;
        const float d = H1[i * h0 + i * h1];
        for (int64_t r = 0; r < out; r++) {
            const float sr = s[r * ss], zr = z[r * zs];
            float v = w[r] / sr;
            v = rintf(v);
            v = v + zr;
            v = v < 0.0f ? 0.0f : v;  /* np.maximum(q, 0): keeps q when q >= 0 (also -0.0) */
            v = v > maxq ? maxq : v;  /* np.minimum(q, maxq) */
            q[r] = v;
            float dq = v - zr;
            dq = dq * sr;
            dq = w[r] - dq;
            err[r] = dq / d;
        }
        for (int64_t j = i + 1; j < b; j++) {
            const float h = H1[i * h0 + j * h1];
            float *wj = WT + j * out;
            for (int64_t r = 0; r < out; r++) {
                const float t = h * err[r];
                wj[r] = wj[r] - t;
            }
        }
    }
}

/* The upper triangle of a row-major n x n float matrix mirrored into its lower one, in place, in 64 x 64 tiles:
 * a[j][i] = a[i][j] for i < j (the inverse-factor chain of kernels/cpu_lapack.py; pure data movement). */
void qr_tri_mirror(float *a, int64_t n) {
    const int64_t T = 64;
    for (int64_t bi = 0; bi < n; bi += T) {
        const int64_t ie = bi + T < n ? bi + T : n;
        for (int64_t bj = bi; bj < n; bj += T) {
            const int64_t je = bj + T < n ? bj + T : n;
            for (int64_t i = bi; i < ie; i++) {
                const float *row = a + i * n;
                for (int64_t j = bj > i + 1 ? bj : i + 1; j < je; j++)
                    a[j * n + i] = row[j];
            }
        }
    }
}

/* out[i][j] = src[r(i)][cols[j]] for a row-major src of row stride `ss` (elements), out [rows, n] contiguous;
 * r(i) = rows_idx[i], or i when rows_idx is NULL. Every source row is read whole while it is hot in cache: the
 * act-order permutations of GPTQ (H[perm][:, perm], W[:, perm], codes[:, inv]); pure data movement. */
#define QR_TAKE2D(NAME, T)                                                                                       \
    void NAME(T *out, const T *src, int64_t rows, int64_t n, int64_t ss, const int64_t *rows_idx,              \
              const int64_t *cols) {                                                                           \
        for (int64_t i = 0; i < rows; i++) {                                                                   \
            const T *row = src + (rows_idx ? rows_idx[i] : i) * ss;                                            \
            T *o = out + i * n;                                                                                \
            for (int64_t j = 0; j < n; j++)                                                                    \
                o[j] = row[cols[j]];                                                                           \
        }                                                                                                      \
    }
QR_TAKE2D(qr_take2d_f32, float)
QR_TAKE2D(qr_take2d_u8, uint8_t)
