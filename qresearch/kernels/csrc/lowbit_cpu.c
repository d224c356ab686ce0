/* Fused dequant + matmul for packed low-bit weights on CPU (fp32 math), called through ctypes.
 *
 * Weight layout (built once by qresearch/kernels/cpu_packed.py, or a layer's stored words read in place): N rows
 * x G groups, gp codes each but the last, which holds gl <= gp; gp and gl multiples of 32 (a group padded with code
 * 0 up to gp; the matching activations are 0), K = (G - 1) * gp + gl codes per row. Codes are unsigned:
 *   nib = 1: each 32-code chunk is 16 bytes, byte i = code i (low nibble) | code 16 + i (high nibble);
 *   nib = 2: each 32-code chunk is 16 bytes, byte i = code 2i (low nibble) | code 2i + 1 (high nibble): the packed
 *            int32_k stream of 4-bit codes itself (little-endian; the matmuls run it as nib = 1, see split_x);
 *   nib = 0: one byte per code.
 * Per (row, group): scale s and zero point z (fp32); weight = (code - z) * s as in the torch reference.
 * y[m, n] = bias[n] + sum_g s[n, g] * sum_i x[m, g * gp + i] * (code - z[n, g]).
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define NB 4 /* weight rows per block: one activation load feeds NB FMAs */

/* codes in group g: gp, gl for the last */
static inline int64_t glen(int64_t g, int64_t G, int64_t gp, int64_t gl) { return g == G - 1 ? gl : gp; }

/* bytes per weight row */
static inline int64_t row_bytes(int64_t G, int64_t gp, int64_t gl, int nib) {
    const int64_t k = (G - 1) * gp + gl;
    return nib ? k / 2 : k;
}

static void dequant_group(const uint8_t *restrict w, int64_t gp, int nib, float z, float *restrict out) {
    if (nib == 2) {
        for (int64_t c = 0; c < gp; c += 32) {
            const uint8_t *b = w + c / 2;
#pragma omp simd
            for (int i = 0; i < 16; i++) {
                out[c + 2 * i] = (float)(b[i] & 15) - z;
                out[c + 2 * i + 1] = (float)(b[i] >> 4) - z;
            }
        }
    } else if (nib) {
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
                      int64_t nr, int64_t G, int64_t gp, int64_t gl, int nib, const float *restrict s,
                      const float *restrict z, const float *restrict bias, float *restrict y, int64_t N,
                      float *restrict buf, float *restrict acc) {
    const int64_t gb = nib ? gp / 2 : gp, rowb = row_bytes(G, gp, gl, nib);
    for (int64_t i = 0; i < M * NB; i++) acc[i] = 0.0f;
    for (int64_t r = nr; r < NB; r++)  /* a short last block repeats no row: its buffers stay zero */
        for (int64_t i = 0; i < gp; i++) buf[r * gp + i] = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        const int64_t len = glen(g, G, gp, gl);
        for (int64_t r = 0; r < nr; r++)
            dequant_group(w + (n0 + r) * rowb + g * gb, len, nib, z[(n0 + r) * G + g], buf + r * gp);
        const float *b0 = buf, *b1 = buf + gp, *b2 = buf + 2 * gp, *b3 = buf + 3 * gp;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx + g * gp;
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t i = 0; i < len; i++) {
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

/* nib = 2 (the stream's nibbles: byte i of a chunk holds codes 2i, 2i + 1) runs as nib = 1 (codes i, 16 + i) on a
 * copy of x [M, K] with each 32-column chunk's even columns first, then its odd ones: the same codes meet the same
 * activations, and the fused and many-row loops keep one summation order. NULL if it cannot be allocated. */
static float *split_x(const float *x, int64_t M, int64_t ldx, int64_t K, int nthreads) {
    /* 64-byte aligned, as torch's tensors are: malloc's 16-byte alignment split the many-row loop's 64-byte loads
     * across cache lines (4096x4096 w4, 512 rows: 1.5x slower than on a torch tensor) */
    const size_t bytes = (sizeof(float) * (size_t)(M * K > 0 ? M * K : 1) + 63) / 64 * 64;
    float *xs = aligned_alloc(64, bytes);
    if (!xs) return NULL;
#pragma omp parallel for num_threads(M * K >= (1 << 16) ? nthreads : 1) schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32) {
            const float *xc = x + m * ldx + c;
            float *o = xs + m * K + c;
#if defined(__AVX512F__)
            const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            const __m512 a = _mm512_loadu_ps(xc), b = _mm512_loadu_ps(xc + 16);
            _mm512_storeu_ps(o, _mm512_permutex2var_ps(a, even, b));
            _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b));
#else
            for (int i = 0; i < 16; i++) {
                o[i] = xc[2 * i];
                o[16 + i] = xc[2 * i + 1];
            }
#endif
        }
    return xs;
}

#if defined(__AVX512F__)
#define RT_MAX 8 /* weight rows per register tile (8 for one activation row, 4 for up to 4 rows) */

/* 16 weights (code - z) * s of one row and group from the 32-code chunk at b (its first byte): bytes b[16h..16h + 15]
 * (nib = 0), or the low (h = 0) or high (h = 1) nibbles of b[0..15] (nib = 1); formed with one fmsub,
 * code * s - z * s (see tile512) */
static inline __attribute__((always_inline)) __m512 weights16(const uint8_t *b, int nib, int h, __m512 sv, __m512 zsv) {
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(nib ? b : b + 16 * h)));
    if (nib) q = h ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, _mm512_set1_epi32(15));
    return _mm512_fmsub_ps(_mm512_cvtepi32_ps(q), sv, zsv);
}

/* the 16 weights (q - z) * s a code q < 16 can stand for in one row and group, by the same fmsub as weights16 (q is
 * exact in fp32): a 4-bit code's weight is then one permute instead of a conversion and an fmsub */
static inline __attribute__((always_inline)) __m512 lut16(__m512 sv, __m512 zsv) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_fmsub_ps(iota, sv, zsv);
}

/* weights16 for nibble codes (nib = 1) through the row-group's table: the low (h = 0) or high (h = 1) nibbles of
 * b[0..15]; vpermps reads only the low 4 bits of each index lane, so the low nibble needs no mask */
static inline __attribute__((always_inline)) __m512 weights16_lut(const uint8_t *b, int h, __m512 lut) {
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    if (h) q = _mm512_srli_epi32(q, 4);
    return _mm512_permutexvar_ps(q, lut);
}

/* out[0..3] = the horizontal sums of a, b, c, d, four at a time, each paired as GCC's _mm512_reduce_add_ps pairs
 * (lane i + lane i + 8, then j + j + 4, then 0 + 2 and 1 + 3, then those two: the bits of the earlier builds, which
 * called it per vector); every tile sums through here, so the fused tiles and the many-row loop agree whatever the
 * compiler. ~14 instructions for four sums instead of ~32 */
static inline __attribute__((always_inline)) void hsum4x(__m512 a, __m512 b, __m512 c, __m512 d, float *out) {
    /* [a.T3 | b.T3], [c.T3 | d.T3]: T3[i] = v[i] + v[i + 8] */
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    /* 128-bit lane q = vector q's T6: T6[j] = T3[j] + T3[j + 4] */
    const __m512 t6 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    /* T8[0] = T6[0] + T6[2], T8[1] = T6[1] + T6[3]; then T8[0] + T8[1] in element 0 of each 128-bit lane */
    const __m512 t8 = _mm512_add_ps(t6, _mm512_permute_ps(t6, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512 t9 = _mm512_add_ps(t8, _mm512_permute_ps(t8, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, t9)));
}

/* out[m * RT + r] = sum over all groups of x[m] . w[rows[r]], w = (code - z) * s formed exactly with one fmsub
 * (code * s - z * s: z * s is exact in fp32 for 16-bit scales, so the rounding gives (code - z) * s exactly); for
 * nibble codes that fmsub runs once per row and group on q = 0..15 (lut16, held in sv[r]) and each code picks its
 * value from there, so the weights are the same floats either way. */
static inline __attribute__((always_inline)) void tile512(const float *x, int64_t ldx, const int MT, const int RT,
                                                          const uint8_t *w, const int64_t *rows, int64_t G,
                                                          int64_t gp, int64_t gl, int nib, const float *s,
                                                          const float *zs, float *out) {
    const int64_t gb = nib ? gp / 2 : gp, rowb = row_bytes(G, gp, gl, nib);
    __m512 acc[4][RT_MAX];
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < RT; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 sv[RT_MAX], zv[RT_MAX];
        for (int r = 0; r < RT; r++) {
            sv[r] = _mm512_set1_ps(s[rows[r] * G + g]);
            zv[r] = _mm512_set1_ps(zs[rows[r] * G + g]);
            if (nib) sv[r] = lut16(sv[r], zv[r]); /* sv[r]: the row-group's table */
        }
        const int64_t len = glen(g, G, gp, gl);
        for (int64_t c = 0; c < len; c += 32)
            for (int h = 0; h < 2; h++) { /* codes c + 16h .. c + 16h + 15 */
                __m512 wv[RT_MAX];
                for (int r = 0; r < RT; r++)
                    wv[r] = nib ? weights16_lut(w + rows[r] * rowb + g * gb + c / 2, h, sv[r])
                                : weights16(w + rows[r] * rowb + g * gb + c, 0, h, sv[r], zv[r]);
                for (int m = 0; m < MT; m++) {
                    __m512 xv = _mm512_loadu_ps(x + m * ldx + g * gp + c + 16 * h);
                    __asm__("" : "+v"(xv)); /* one load, not one per FMA (see dot_tile512) */
                    for (int r = 0; r < RT; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
                }
            }
    }
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < RT; r += 4) hsum4x(acc[m][r], acc[m][r + 1], acc[m][r + 2], acc[m][r + 3], out + m * RT + r);
}

/* rows [n0, n0 + RT) (clamped to N - 1 at the edge) x all M rows; zs: z * s precomputed [N, G] */
static void block512(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int64_t n0, int64_t N, int64_t G,
                     int64_t gp, int64_t gl, int nib, const float *s, const float *zs, const float *bias, float *y) {
    const int RT = M == 1 ? 8 : 4;
    int64_t rows[RT_MAX];
    float out[4 * RT_MAX];
    for (int r = 0; r < RT; r++) rows[r] = n0 + r < N ? n0 + r : N - 1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mt = M - m0 < 4 ? (int)(M - m0) : 4;
        const float *xm = x + m0 * ldx;
        switch (M == 1 ? 0 : mt) { /* constant tile shapes: the compiler keeps the accumulators in registers */
            case 0: tile512(xm, ldx, 1, 8, w, rows, G, gp, gl, nib, s, zs, out); break;
            case 1: tile512(xm, ldx, 1, 4, w, rows, G, gp, gl, nib, s, zs, out); break;
            case 2: tile512(xm, ldx, 2, 4, w, rows, G, gp, gl, nib, s, zs, out); break;
            case 3: tile512(xm, ldx, 3, 4, w, rows, G, gp, gl, nib, s, zs, out); break;
            default: tile512(xm, ldx, 4, 4, w, rows, G, gp, gl, nib, s, zs, out); break;
        }
        for (int m = 0; m < mt; m++)
            for (int r = 0; r < RT && n0 + r < N; r++)
                y[(m0 + m) * N + n0 + r] = out[m * RT + r] + (bias ? bias[n0 + r] : 0.0f);
    }
}

/* Many activation rows: the fused tiles above dequantize every weight vector once per 4 activation rows, which
 * costs about as many vector operations as the FMAs. Here a block of weight rows is dequantized once into a
 * buffer (the same fmsub, so the same values) and reused by every activation row of the chunk. */
#define LM_MT 6  /* activation rows per register tile */
#define LM_RT 4  /* weight rows per register tile: 6 x 4 accumulators + 4 weights + 1 activation = 29 zmm */

/* wb [RB, K] = (code - z) * s for rows n0 .. n0 + RB - 1 (clamped to N - 1 at the edge), K = (G - 1) * gp + gl */
static void dequant_rows512(const uint8_t *w, int64_t n0, int64_t RB, int64_t N, int64_t G, int64_t gp, int64_t gl,
                            int nib, const float *s, const float *zs, float *wb) {
    const int64_t gb = nib ? gp / 2 : gp, rowb = row_bytes(G, gp, gl, nib), K = (G - 1) * gp + gl;
    for (int64_t r = 0; r < RB; r++) {
        const int64_t n = n0 + r < N ? n0 + r : N - 1;
        for (int64_t g = 0; g < G; g++) {
            const __m512 sv = _mm512_set1_ps(s[n * G + g]), zv = _mm512_set1_ps(zs[n * G + g]);
            const uint8_t *b = w + n * rowb + g * gb;
            float *o = wb + r * K + g * gp;
            for (int64_t c = 0; c < glen(g, G, gp, gl); c += 32)
                for (int h = 0; h < 2; h++)
                    _mm512_storeu_ps(o + c + 16 * h, weights16(b + (nib ? c / 2 : c), nib, h, sv, zv));
        }
    }
}

/* out[m * LM_RT + r] = x[m] . wb[r] over K (a multiple of 16) for MT activation rows */
static inline __attribute__((always_inline)) void dot_tile512(const float *x, int64_t ldx, const float *wb,
                                                              int64_t K, const int MT, float *out) {
    __m512 acc[LM_MT][LM_RT];
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < LM_RT; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv[LM_RT];
        for (int r = 0; r < LM_RT; r++) wv[r] = _mm512_loadu_ps(wb + r * K + k);
        for (int m = 0; m < MT; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
            /* xv in a register: GCC otherwise folds the load into each of the LM_RT FMAs (28 loads per step
             * instead of 10 at MT = 6), which bounds the loop by the load ports instead of the FMAs */
            __asm__("" : "+v"(xv));
            for (int r = 0; r < LM_RT; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < MT; m++) hsum4x(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * LM_RT);
}

/* y[0:M, n0:n0 + RB] from the dequantized rows wb [RB, K] */
static void rows_many512(const float *x, int64_t M, int64_t ldx, const float *wb, int64_t n0, int64_t RB,
                         int64_t N, int64_t K, const float *bias, float *y) {
    float out[LM_MT * LM_RT];
    for (int64_t m0 = 0; m0 < M; m0 += LM_MT) {
        const int mt = M - m0 < LM_MT ? (int)(M - m0) : LM_MT;
        for (int64_t r0 = 0; r0 < RB && n0 + r0 < N; r0 += LM_RT) {
            const float *xm = x + m0 * ldx, *w0 = wb + r0 * K;
            switch (mt) { /* constant tile shapes: the accumulators stay in registers */
                case 1: dot_tile512(xm, ldx, w0, K, 1, out); break;
                case 2: dot_tile512(xm, ldx, w0, K, 2, out); break;
                case 3: dot_tile512(xm, ldx, w0, K, 3, out); break;
                case 4: dot_tile512(xm, ldx, w0, K, 4, out); break;
                case 5: dot_tile512(xm, ldx, w0, K, 5, out); break;
                default: dot_tile512(xm, ldx, w0, K, LM_MT, out); break;
            }
            for (int m = 0; m < mt; m++)
                for (int r = 0; r < LM_RT && n0 + r0 + r < N; r++)
                    y[(m0 + m) * N + n0 + r0 + r] = out[m * LM_RT + r] + (bias ? bias[n0 + r0 + r] : 0.0f);
        }
    }
}

/* y [M, N] = x [M, K] @ dequant(w)^T + bias for many rows: weight rows in blocks of RB (a multiple of LM_RT)
 * dequantized once per chunk of MC activation rows. Returns 0, or 1 if a buffer could not be allocated. */
int qr_lowbit_mm_many(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int64_t N, int64_t G, int64_t gp,
                      int64_t gl, int nib, const float *s, const float *zs, const float *bias, float *y, int64_t RB,
                      int64_t MC, int nthreads) {
    int failed = 0;
    const int64_t K = (G - 1) * gp + gl, nblocks = (N + RB - 1) / RB;
    if (ldx != K || RB % LM_RT) return 2;
    if (nib == 2) {
        float *xs = split_x(x, M, ldx, K, nthreads);
        if (!xs) return 1;
        failed = qr_lowbit_mm_many(xs, M, K, w, N, G, gp, gl, 1, s, zs, bias, y, RB, MC, nthreads);
        free(xs);
        return failed;
    }
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *wb = aligned_alloc(64, sizeof(float) * RB * K);
        if (!wb) failed = 1;
        for (int64_t c0 = 0; c0 < M; c0 += MC) {
            const int64_t mc = M - c0 < MC ? M - c0 : MC;
#pragma omp for schedule(dynamic, 1)
            for (int64_t nb = 0; nb < nblocks; nb++) {
                if (!wb) continue;
                dequant_rows512(w, nb * RB, RB, N, G, gp, gl, nib, s, zs, wb);
                rows_many512(x + c0 * ldx, mc, ldx, wb, nb * RB, RB, N, K, bias, y + c0 * N);
            }
        }
        free(wb);
    }
    return failed;
}
#else
int qr_lowbit_mm_many(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int64_t N, int64_t G, int64_t gp,
                      int64_t gl, int nib, const float *s, const float *zs, const float *bias, float *y, int64_t RB,
                      int64_t MC, int nthreads) {
    return 3; /* built without AVX-512: the caller dequantizes panels and runs the dense matmul */
}
#endif

/* 1 if qr_lowbit_mm_many is built (AVX-512), else 0 */
int qr_lowbit_has_many(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* y [M, N] = x [M, K] (row stride ldx) @ dequant(w)^T + bias; zs = z * s (exact for 16-bit scales).
 * Returns 0, or 1 if a row buffer could not be allocated. */
int qr_lowbit_mm(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int64_t N, int64_t G, int64_t gp,
                 int64_t gl, int nib, const float *s, const float *z, const float *zs, const float *bias, float *y,
                 int nthreads) {
    int failed = 0;
    if (nib == 2) {
        const int64_t K = (G - 1) * gp + gl;
        float *xs = split_x(x, M, ldx, K, nthreads);
        if (!xs) return 1;
        failed = qr_lowbit_mm(xs, M, K, w, N, G, gp, gl, 1, s, z, zs, bias, y, nthreads);
        free(xs);
        return failed;
    }
    const int par = nthreads > 1 && N * G * gp * (M < 4 ? M : 4) >= (1 << 16);
#if defined(__AVX512F__)
    (void)z;
    const int64_t rt = M == 1 ? 8 : 4;
    if (!par) {
        for (int64_t nb = 0; nb < (N + rt - 1) / rt; nb++)
            block512(x, M, ldx, w, nb * rt, N, G, gp, gl, nib, s, zs, bias, y);
        return 0;
    }
    /* dynamic: on a shared machine a preempted thread's rows are taken over instead of awaited */
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t nb = 0; nb < (N + rt - 1) / rt; nb++)
        block512(x, M, ldx, w, nb * rt, N, G, gp, gl, nib, s, zs, bias, y);
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
                row_block(x, M, ldx, w, n0, nr, G, gp, gl, nib, s, z, bias, y, N, buf, buf + NB * gp);
            }
            free(buf);
        }
    }
    return failed;
}

/* out [N, K] = (code - z) * s, the whole weight in fp32, K = (G - 1) * gp + gl */
void qr_lowbit_dequant(const uint8_t *w, int64_t N, int64_t G, int64_t gp, int64_t gl, int nib, const float *s,
                       const float *z, float *out, int nthreads) {
    const int64_t gb = nib ? gp / 2 : gp, rowb = row_bytes(G, gp, gl, nib), K = (G - 1) * gp + gl;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t len = glen(g, G, gp, gl);
            float *o = out + n * K + g * gp;
            const float sc = s[n * G + g];
            dequant_group(w + n * rowb + g * gb, len, nib, z[n * G + g], o);
#pragma omp simd
            for (int64_t i = 0; i < len; i++) o[i] *= sc;
        }
}

/* fp32 -> bf16 bits, round to nearest even (torch's rounding for finite values) */
static inline uint16_t bf16_bits(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* one decoded weight into out[j]: fp32, or bf16 bits when BF16 */
static inline __attribute__((always_inline)) void put(void *out, int64_t j, float v, const int BF16) {
    if (BF16) ((uint16_t *)out)[j] = bf16_bits(v);
    else ((float *)out)[j] = v;
}

/* out[j0 .. j1) of one row for codes that never straddle words (BITS divides 32), j0 a multiple of 32 / BITS */
static inline __attribute__((always_inline)) void decode_words(const uint32_t *w, int64_t j0, int64_t j1,
                                                               const int BITS, float z, float s, void *out,
                                                               const int BF16) {
    const int per = 32 / BITS;
    const uint32_t mask = (1u << BITS) - 1;
    int64_t j = j0;
#if defined(__AVX512F__)
    { /* 16 codes a step: lane i takes word (j + i) / per, shifted right by ((j + i) % per) * BITS */
        int lane_word[16], lane_shift[16];
        for (int i = 0; i < 16; i++) lane_word[i] = i / per, lane_shift[i] = (i % per) * BITS;
        const __m512i idx = _mm512_loadu_si512(lane_word), sh = _mm512_loadu_si512(lane_shift);
        const __m512i mv = _mm512_set1_epi32((int)mask), half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
        const __m512 zv = _mm512_set1_ps(z), sv = _mm512_set1_ps(s);
        for (; j + 16 <= j1; j += 16) {
            const uint32_t *wj = w + j / per;
            const __m512i wv = per == 16 ? _mm512_set1_epi32((int)wj[0])
                               : per == 8 ? _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(
                                                _mm_loadl_epi64((const __m128i *)wj)))
                                          : _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(
                                                _mm_loadu_si128((const __m128i *)wj)));
            const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(wv, sh), mv);
            const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), zv), sv);
            if (BF16) { /* bf16_bits on 16 lanes */
                __m512i u = _mm512_castps_si512(v);
                u = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
            } else {
                _mm512_storeu_ps((float *)out + j, v);
            }
        }
    }
#endif
    for (; j + per <= j1; j += per) {
        const uint32_t word = w[j / per];
        for (int i = 0; i < per; i++) put(out, j + i, ((float)((word >> (i * BITS)) & mask) - z) * s, BF16);
    }
    for (; j < j1; j++) put(out, j, ((float)((w[j / per] >> ((j % per) * BITS)) & mask) - z) * s, BF16);
}

/* one row: out[j] = (code j - z[g]) * s[g], g = g_idx[j] or j / group */
static inline __attribute__((always_inline)) void decode_row(const uint32_t *w, int64_t K, int bits, const float *s,
                                                             const float *z, int64_t G, int64_t group,
                                                             const int32_t *g_idx, void *out, const int BF16) {
    const uint32_t mask = (1u << bits) - 1;
    if ((bits == 2 || bits == 4 || bits == 8) && !g_idx && group % (32 / bits) == 0) { /* constant shifts */
        for (int64_t g = 0; g < G; g++) {
            const int64_t j0 = g * group, j1 = j0 + group < K ? j0 + group : K;
            switch (bits) {
                case 2: decode_words(w, j0, j1, 2, z[g], s[g], out, BF16); break;
                case 4: decode_words(w, j0, j1, 4, z[g], s[g], out, BF16); break;
                default: decode_words(w, j0, j1, 8, z[g], s[g], out, BF16); break;
            }
        }
        return;
    }
    for (int64_t j = 0; j < K; j++) { /* the bit stream: 32 codes take `bits` words */
        const int64_t bit = (j >> 5) * 32 * bits + (j & 31) * bits, wi = bit >> 5;
        const int sh = (int)(bit & 31);
        uint32_t v = w[wi] >> sh;
        if (sh + bits > 32) v |= w[wi + 1] << (32 - sh);
        const int64_t g = g_idx ? g_idx[j] : j / group;
        put(out, j, ((float)(v & mask) - z[g]) * s[g], BF16);
    }
}

/* out [rows, K] = (code - z) * s, the reference's decode (fp32; out_bf16: then rounded to bf16 as torch rounds),
 * from the stored buffers: codes in pack_rows' int32 bit stream (wpr words a row, the last block of 32 codes
 * truncated), column j in group g_idx[j] (or j / group); s, z fp32 [rows, G]. qw, s, z point at the first row. */
void qr_stream_dequant(const uint32_t *qw, int64_t wpr, int64_t rows, int64_t K, int bits, const float *s,
                       const float *z, int64_t G, int64_t group, const int32_t *g_idx, void *out, int out_bf16,
                       int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (out_bf16)
            decode_row(qw + r * wpr, K, bits, s + r * G, z + r * G, G, group, g_idx, (uint16_t *)out + r * K, 1);
        else
            decode_row(qw + r * wpr, K, bits, s + r * G, z + r * G, G, group, g_idx, (float *)out + r * K, 0);
    }
}
