/* Integer products of W8A8 layers on CPU, reading the layer's stored weight bytes in place (called via ctypes).
 *
 * A symmetric 8-bit layer stores unsigned codes u = w + 128 (int32_k words: on a little-endian machine row n's
 * bytes are its codes in column order, ldw bytes apart). With int8 activations x:
 *   acc[m, n] = sum_k x[m, k] * (u[n, k] - 128) = sum_k x[m, k] * u[n, k] - 128 * sum_k x[m, k]
 * The first sum is AVX512-VNNI's vpdpbusd (unsigned bytes times signed bytes, four products added into each int32
 * lane, no saturation); the second is the row sum of x. Integer arithmetic throughout: acc equals torch._int_mm's
 * x @ (u - 128)^T exactly while |acc| < 2^31 (checked by the caller: 128 * 255 * K < 2^31, K < 65793).
 * Tiles: NT = 4 weight rows by MT <= 4 activation rows, 16 zmm accumulators, K in KC-byte chunks (a tile's rows stay
 * in L1; later chunks add into out); weight rows in blocks of 64 (L2) visited by activation rows 16 at a time, so
 * every weight byte is read from memory once. One activation row: tiles of 8 weight rows over all of K.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#define KC 2048 /* bytes of K per chunk (multiple of 64) */
#else
#define HAVE_VNNI 0
#endif

int qr_int8_has_vnni(void) { return HAVE_VNNI; }

#if HAVE_VNNI
/* acc[m0 + i, n0 + j] for i < MT, j < NT over all K (x rows ldx apart, weight rows ldw apart, out rows ldo apart) */
static inline __attribute__((always_inline)) void tile(const int8_t *x, int64_t ldx, const uint8_t *w, int64_t ldw,
                                                       int64_t K, const int32_t *xsum, int32_t *out, int64_t ldo,
                                                       const int MT, const int NT, const int add) {
    __m512i acc[4][8];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i wv[8];
        for (int j = 0; j < NT; j++) wv[j] = _mm512_loadu_si512((const void *)(w + j * ldw + k));
        for (int i = 0; i < MT; i++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + i * ldx + k));
            /* xv in a register: GCC otherwise folds this load into each of the NT vpdpbusd (NT loads, not one) */
            __asm__("" : "+v"(xv));
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], xv);
        }
    }
    if (k < K) { /* tail: bytes past K load as 0 in both operands */
        const __mmask64 mask = (__mmask64)(~0ULL >> (64 - (K - k)));
        __m512i wv[8];
        for (int j = 0; j < NT; j++) wv[j] = _mm512_maskz_loadu_epi8(mask, (const void *)(w + j * ldw + k));
        for (int i = 0; i < MT; i++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mask, (const void *)(x + i * ldx + k));
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], xv);
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NT; j++) {
            const int32_t v = _mm512_reduce_add_epi32(acc[i][j]);
            out[i * ldo + j] = add ? out[i * ldo + j] + v : v - 128 * xsum[i];
        }
}

/* all activation row tiles of weight rows [n0, n0 + NT) */
static inline __attribute__((always_inline)) void column(const int8_t *x, int64_t ldx, int64_t m0, int64_t m1,
                                                         const uint8_t *w, int64_t ldw, int64_t K,
                                                         const int32_t *xsum, int32_t *out, int64_t N, const int NT,
                                                         const int add) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) tile(x + m * ldx, ldx, w, ldw, K, xsum + m, out + m * N, N, 4, NT, add);
    switch (m1 - m) {
        case 3: tile(x + m * ldx, ldx, w, ldw, K, xsum + m, out + m * N, N, 3, NT, add); break;
        case 2: tile(x + m * ldx, ldx, w, ldw, K, xsum + m, out + m * N, N, 2, NT, add); break;
        case 1: tile(x + m * ldx, ldx, w, ldw, K, xsum + m, out + m * N, N, 1, NT, add); break;
        default: break;
    }
}

/* rows [m0, m1) of x against weight rows [n0, n1) in tiles of 4 x 4 */
static void block(const int8_t *x, int64_t ldx, int64_t m0, int64_t m1, const uint8_t *w, int64_t ldw, int64_t n0,
                  int64_t n1, int64_t K, const int32_t *xsum, int32_t *out, int64_t N) {
    for (int64_t k0 = 0; k0 < K; k0 += KC) { /* K in chunks: a tile's x and weight rows stay in L1 */
        const int64_t kc = K - k0 < KC ? K - k0 : KC;
        const int add = k0 > 0;
        for (int64_t n = n0; n < n1; n += 4) {
            const uint8_t *wt = w + n * ldw + k0;
            const int8_t *xk = x + k0;
            switch (n1 - n >= 4 ? 4 : n1 - n) {
                case 4: column(xk, ldx, m0, m1, wt, ldw, kc, xsum, out + n, N, 4, add); break;
                case 3: column(xk, ldx, m0, m1, wt, ldw, kc, xsum, out + n, N, 3, add); break;
                case 2: column(xk, ldx, m0, m1, wt, ldw, kc, xsum, out + n, N, 2, add); break;
                default: column(xk, ldx, m0, m1, wt, ldw, kc, xsum, out + n, N, 1, add); break;
            }
        }
    }
}
#endif

/* Per-token int8 activations as kernels/reference.act_quant_ref makes them, bit for bit: s = absmax / 127 (IEEE
 * division; 1 where that is not > 0) or the given static scale, q = clamp(round_half_even(x / s), -128, 127), plus
 * the row sums of q. x [M, K] fp32 (rows ldx apart). Returns 0, or 1 if a row holds NaN (nothing is promised
 * then: the caller quantizes with torch). */
int qr_int8_act_quant(const float *x, int64_t ldx, int64_t M, int64_t K, float static_s, int use_static,
                      int8_t *q, float *s, int32_t *xsum, int nthreads) {
#if HAVE_VNNI
    int bad = 0;
#pragma omp parallel for num_threads(M * K >= (1 << 16) ? nthreads : 1) schedule(static) reduction(| : bad)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        int8_t *qr = q + m * K;
        float sc = static_s;
        if (!use_static) {
            __m512 mx = _mm512_setzero_ps();
            __mmask16 nan = 0;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                const __m512 v = _mm512_loadu_ps(xr + k);
                nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
            }
            if (k < K) {
                const __mmask16 t = (__mmask16)((1u << (K - k)) - 1);
                const __m512 v = _mm512_maskz_loadu_ps(t, xr + k);
                nan |= _mm512_mask_cmp_ps_mask(t, v, v, _CMP_UNORD_Q);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
            }
            if (nan) {
                bad = 1;
                continue;
            }
            sc = _mm512_reduce_max_ps(mx) / 127.0f;
            if (!(sc > 0.0f)) sc = 1.0f;
        }
        s[m] = sc;
        const __m512 sv = _mm512_set1_ps(sc), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
        __m512i acc = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 t = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(t, xr + k);
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
            const __m512i qi = _mm512_maskz_cvtps_epi32(t, r);
            acc = _mm512_add_epi32(acc, qi);
            _mm_mask_storeu_epi8(qr + k, t, _mm512_cvtsepi32_epi8(qi));
        }
        xsum[m] = _mm512_reduce_add_epi32(acc);
    }
    return bad;
#else
    (void)x; (void)ldx; (void)M; (void)K; (void)static_s; (void)use_static; (void)q; (void)s; (void)xsum;
    (void)nthreads;
    return 1;
#endif
}

/* out [M, N] int32 = x [M, K] int8 @ (u [N, K] uint8 - 128)^T; xsum [M] = row sums of x. Returns 0, or -1 where
 * this build has no AVX512-VNNI (nothing written). */
int qr_int8_u8s8_mm(const int8_t *x, int64_t ldx, int64_t M, const uint8_t *w, int64_t ldw, int64_t N, int64_t K,
                    const int32_t *xsum, int32_t *out, int nthreads) {
#if HAVE_VNNI
    if (M == 1) { /* one activation row: 8 weight rows a tile, more loads in flight for the memory-bound case */
        const int64_t t8 = (N + 7) / 8;
#pragma omp parallel for num_threads(N * K >= (1 << 16) ? nthreads : 1) schedule(static)
        for (int64_t t = 0; t < t8; t++) {
            const int64_t n0 = t * 8;
            if (N - n0 >= 8) tile(x, ldx, w + n0 * ldw, ldw, K, xsum, out + n0, N, 1, 8, 0);
            else for (int64_t n = n0; n < N; n++) tile(x, ldx, w + n * ldw, ldw, K, xsum, out + n, N, 1, 1, 0);
        }
        return 0;
    }
    /* weight row blocks of NBLK rows (L2) visited by chunks of MBLK activation rows */
    const int64_t NBLK = 64, MBLK = 16, nblocks = (N + NBLK - 1) / NBLK;
#pragma omp parallel for num_threads(M * N * K >= (1 << 16) ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n0 = b * NBLK, n1 = n0 + NBLK < N ? n0 + NBLK : N;
        for (int64_t m0 = 0; m0 < M; m0 += MBLK)
            block(x, ldx, m0, m0 + MBLK < M ? m0 + MBLK : M, w, ldw, n0, n1, K, xsum, out, N);
    }
    return 0;
#else
    (void)x; (void)ldx; (void)M; (void)w; (void)ldw; (void)N; (void)K; (void)xsum; (void)out; (void)nthreads;
    return -1;
#endif
}

/* The W8A8 rescale of int_mm.w8a8_epilogue, bit for bit: y[m, n] = (float)acc[m, n] * sx[m] * sw[n] (+ bias[n]),
 * each product and the sum rounded to fp32 in that order, as torch's separate ops round them (built with
 * -ffp-contract=off: no fused multiply-add). acc and y [M, N] (rows N apart); bias may be NULL. */
void qr_int8_rescale(const int32_t *acc, int64_t M, int64_t N, const float *sx, const float *sw, const float *bias,
                     float *y, int nthreads) {
#pragma omp parallel for num_threads(M * N >= (1 << 16) ? nthreads : 1) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const int32_t *a = acc + m * N;
        float *out = y + m * N;
        const float s = sx[m];
        if (bias)
            for (int64_t n = 0; n < N; n++) out[n] = (float)a[n] * s * sw[n] + bias[n];
        else
            for (int64_t n = 0; n < N; n++) out[n] = (float)a[n] * s * sw[n];
    }
}
