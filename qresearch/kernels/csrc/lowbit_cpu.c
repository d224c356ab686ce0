/* Fused dequant + matmul for packed low-bit weights on CPU (fp32 math), called through ctypes.
 *
 * Weight layout (built once by qresearch/kernels/cpu_packed.py): N rows x G groups x gp codes, gp a multiple
 * of 32 (a group padded with code 0 up to gp; the matching activations are 0). Codes are unsigned:
 *   nib = 1: each 32-code chunk is 16 bytes, byte i = code i (low nibble) | code 16 + i (high nibble);
 *   nib = 0: one byte per code.
 * Per (row, group): scale s and zero point z (fp32); weight = (code - z) * s as in the torch reference.
 * y[m, n] = bias[n] + sum_g s[n, g] * sum_i x[m, g * gp + i] * (code - z[n, g]).
 */
#include <stdint.h>
#include <stdlib.h>

#define NB 4 /* weight rows per block: one activation load feeds NB FMAs */

static void dequant_group(const uint8_t *restrict w, int64_t gp, int nib, float z, float *restrict out) {
    if (nib) {
        for (int64_t c = 0; c < gp; c += 32) {
            const uint8_t *b = w + c / 2;
#pragma omp simd
            for (int i = 0; i < 16; i++) {
                out[c + i] = (float)(b[i] & 15) - z;
                out[c + 16 + i] = (float)(b[i] >> 4) - z;
            }
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < gp; i++) out[i] = (float)w[i] - z;
    }
}

/* rows [n0, n0 + nr) of y for all M activation rows; buf: NB * gp floats, acc: M * NB floats */
static void row_block(const float *restrict x, int64_t M, int64_t ldx, const uint8_t *restrict w, int64_t n0,
                      int64_t nr, int64_t G, int64_t gp, int nib, const float *restrict s, const float *restrict z,
                      const float *restrict bias, float *restrict y, int64_t N, float *restrict buf,
                      float *restrict acc) {
    const int64_t gb = nib ? gp / 2 : gp, rowb = G * gb;
    for (int64_t i = 0; i < M * NB; i++) acc[i] = 0.0f;
    for (int64_t r = nr; r < NB; r++)  /* a short last block repeats no row: its buffers stay zero */
        for (int64_t i = 0; i < gp; i++) buf[r * gp + i] = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        for (int64_t r = 0; r < nr; r++)
            dequant_group(w + (n0 + r) * rowb + g * gb, gp, nib, z[(n0 + r) * G + g], buf + r * gp);
        const float *b0 = buf, *b1 = buf + gp, *b2 = buf + 2 * gp, *b3 = buf + 3 * gp;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx + g * gp;
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t i = 0; i < gp; i++) {
                float xv = xm[i];
                d0 += xv * b0[i];
                d1 += xv * b1[i];
                d2 += xv * b2[i];
                d3 += xv * b3[i];
            }
            float d[NB] = {d0, d1, d2, d3};
            for (int64_t r = 0; r < nr; r++) acc[m * NB + r] += s[(n0 + r) * G + g] * d[r];
        }
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t r = 0; r < nr; r++) y[m * N + n0 + r] = acc[m * NB + r] + (bias ? bias[n0 + r] : 0.0f);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define RT_MAX 8 /* weight rows per register tile (8 for one activation row, 4 for up to 4 rows) */

/* out[m * RT + r] = sum over all groups of x[m] . w[rows[r]], w = (code - z) * s formed exactly with one fmsub
 * (code * s - z * s: z * s is exact in fp32 for 16-bit scales, so the rounding gives (code - z) * s exactly). */
static inline __attribute__((always_inline)) void tile512(const float *x, int64_t ldx, const int MT, const int RT,
                                                          const uint8_t *w, const int64_t *rows, int64_t G,
                                                          int64_t gp, int nib, const float *s, const float *zs,
                                                          float *out) {
    const int64_t gb = nib ? gp / 2 : gp, rowb = G * gb;
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[4][RT_MAX];
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < RT; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 sv[RT_MAX], zv[RT_MAX];
        for (int r = 0; r < RT; r++) {
            sv[r] = _mm512_set1_ps(s[rows[r] * G + g]);
            zv[r] = _mm512_set1_ps(zs[rows[r] * G + g]);
        }
        for (int64_t c = 0; c < gp; c += 32)
            for (int h = 0; h < 2; h++) { /* codes c + 16h .. c + 16h + 15 */
                __m512 wv[RT_MAX];
                for (int r = 0; r < RT; r++) {
                    const uint8_t *b = w + rows[r] * rowb + g * gb + (nib ? c / 2 : c + 16 * h);
                    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
                    if (nib) q = h ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, low4);
                    wv[r] = _mm512_fmsub_ps(_mm512_cvtepi32_ps(q), sv[r], zv[r]);
                }
                for (int m = 0; m < MT; m++) {
                    __m512 xv = _mm512_loadu_ps(x + m * ldx + g * gp + c + 16 * h);
                    for (int r = 0; r < RT; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
                }
            }
    }
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < RT; r++) out[m * RT + r] = _mm512_reduce_add_ps(acc[m][r]);
}

/* rows [n0, n0 + RT) (clamped to N - 1 at the edge) x all M rows; zs: z * s precomputed [N, G] */
static void block512(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int64_t n0, int64_t N, int64_t G,
                     int64_t gp, int nib, const float *s, const float *zs, const float *bias, float *y) {
    const int RT = M == 1 ? 8 : 4;
    int64_t rows[RT_MAX];
    float out[4 * RT_MAX];
    for (int r = 0; r < RT; r++) rows[r] = n0 + r < N ? n0 + r : N - 1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mt = M - m0 < 4 ? (int)(M - m0) : 4;
        const float *xm = x + m0 * ldx;
        switch (M == 1 ? 0 : mt) { /* constant tile shapes: the compiler keeps the accumulators in registers */
            case 0: tile512(xm, ldx, 1, 8, w, rows, G, gp, nib, s, zs, out); break;
            case 1: tile512(xm, ldx, 1, 4, w, rows, G, gp, nib, s, zs, out); break;
            case 2: tile512(xm, ldx, 2, 4, w, rows, G, gp, nib, s, zs, out); break;
            case 3: tile512(xm, ldx, 3, 4, w, rows, G, gp, nib, s, zs, out); break;
            default: tile512(xm, ldx, 4, 4, w, rows, G, gp, nib, s, zs, out); break;
        }
        for (int m = 0; m < mt; m++)
            for (int r = 0; r < RT && n0 + r < N; r++)
                y[(m0 + m) * N + n0 + r] = out[m * RT + r] + (bias ? bias[n0 + r] : 0.0f);
    }
}
#endif

/* y [M, N] = x [M, G * gp] (row stride ldx) @ dequant(w)^T + bias; zs = z * s (exact for 16-bit scales).
 * Returns 0, or 1 if a row buffer could not be allocated. */
int qr_lowbit_mm(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int64_t N, int64_t G, int64_t gp,
                 int nib, const float *s, const float *z, const float *zs, const float *bias, float *y,
                 int nthreads) {
    int failed = 0;
    const int par = nthreads > 1 && N * G * gp * (M < 4 ? M : 4) >= (1 << 16);
#if defined(__AVX512F__)
    (void)z;
    const int64_t rt = M == 1 ? 8 : 4;
    if (!par) {
        for (int64_t nb = 0; nb < (N + rt - 1) / rt; nb++)
            block512(x, M, ldx, w, nb * rt, N, G, gp, nib, s, zs, bias, y);
        return 0;
    }
    /* dynamic: on a shared machine a preempted thread's rows are taken over instead of awaited */
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t nb = 0; nb < (N + rt - 1) / rt; nb++)
        block512(x, M, ldx, w, nb * rt, N, G, gp, nib, s, zs, bias, y);
    return 0;
#endif
    (void)zs;
    const int64_t nblocks = (N + NB - 1) / NB;
#pragma omp parallel num_threads(par ? nthreads : 1) reduction(| : failed)
    {
        float *buf = malloc(sizeof(float) * (NB * gp + M * NB));
        if (!buf) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < nblocks; nb++) {
                int64_t n0 = nb * NB, nr = N - n0 < NB ? N - n0 : NB;
                row_block(x, M, ldx, w, n0, nr, G, gp, nib, s, z, bias, y, N, buf, buf + NB * gp);
            }
            free(buf);
        }
    }
    return failed;
}

/* out [N, G * gp] = (code - z) * s, the whole weight in fp32 (for large M: dequantize once, then sgemm) */
void qr_lowbit_dequant(const uint8_t *w, int64_t N, int64_t G, int64_t gp, int nib, const float *s,
                       const float *z, float *out, int nthreads) {
    const int64_t gb = nib ? gp / 2 : gp;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++) {
            float *o = out + (n * G + g) * gp;
            const float sc = s[n * G + g];
            dequant_group(w + (n * G + g) * gb, gp, nib, z[n * G + g], o);
#pragma omp simd
            for (int64_t i = 0; i < gp; i++) o[i] *= sc;
        }
}
