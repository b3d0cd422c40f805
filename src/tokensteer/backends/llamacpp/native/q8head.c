/* The output layer of a model whose output matrix is Q8_0 (Gemma 3's tied 262k x 640 embedding):
 * logits = W x for a few rows x, reading W once for every 4 rows.
 *
 * llama.cpp runs this layer per row with a dot-product kernel, so every extra row reads the matrix
 * again, and it has no call that runs the layer alone (a formula's mixed rows need that). Here each row's
 * activations are quantised like llama.cpp's (Q8_0: 32 values, one scale), each weight block is
 * loaded once per group of 4 rows, and the integer dot products run on AVX-512 VNNI (two blocks per
 * instruction) or AVX2. A row's logits do not depend on the other rows in the call (same operations
 * in the same order), so batched rows equal rows decoded alone, bit for bit. setup.py builds it once
 * per instruction set (the #if below picks the path); on other CPUs callers keep llama.cpp's own
 * output layer. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VNNI 0
#else
#error "needs AVX-512 (F, BW, DQ, VNNI) or AVX2 with FMA, and F16C"
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 4        /* rows that share one pass over a weight row */
#define BLOCK 32       /* values per Q8_0 block */
#define BLOCK_BYTES 34 /* fp16 scale + 32 int8 */
#define PREFETCH 1024  /* bytes ahead of the weight block being read */

/* Quantise rows like llama.cpp's quantize_row_q8_0; for VNNI they are stored as x + 128 (its
 * unsigned operand). Each block's scale is written 8 times, so two blocks' scales load as one
 * 16-lane vector. */
static void quantize_rows(const float *x, int64_t n_rows, int64_t n_embd, uint8_t *xq, float *xd) {
    const int64_t nb = n_embd / BLOCK;
    for (int64_t i = 0; i < n_rows * nb; i++) {
        const float *s = x + i * BLOCK;
        float amax = 0.f;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(s[j]));
        const float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        for (int j = 0; j < 8; j++) xd[i * 8 + j] = d;
        for (int j = 0; j < BLOCK; j++) xq[i * BLOCK + j] = (uint8_t) ((int) roundf(s[j] * id) + (VNNI ? 128 : 0));
    }
}

/* The sum of a vector's 8 lanes. */
static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if VNNI
static inline float hsum(__m512 a) { return hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))); }

/* One weight row against nr (1..GROUP) quantised rows; out[r * stride] receives row r's logit.
 * Two blocks per iteration: lanes 0-7 hold the first block's sums, lanes 8-15 the second's. */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *w, int64_t nb, const uint8_t *xq,
                                                         const float *xd, const int nr, float *out, int64_t stride) {
    __m512 acc[GROUP];
    for (int r = 0; r < GROUP; r++) acc[r] = _mm512_setzero_ps();
    const __m512i c128 = _mm512_set1_epi8((char) 128);
    /* picks the fp16 scale of each block (16-bit words 0 and 17 from the block pair's start) */
    const __m512i pick = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          17, 17, 17, 17, 17, 17, 17, 17, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t b = 0; b < nb; b += 2) {
        const uint8_t *blk = w + b * BLOCK_BYTES;
        _mm_prefetch((const char *) (blk + PREFETCH), _MM_HINT_T0);
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) (blk + 2))),
                                             _mm256_loadu_si256((const __m256i *) (blk + BLOCK_BYTES + 2)), 1);
        /* (x + 128) . q - 128 * sum(q) = x . q: start every row's sum at -128 * sum(q) */
        const __m512i base = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, q));
        const __m512i raw = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) blk)),
                                               _mm256_loadu_si256((const __m256i *) (blk + 32)), 1);
        const __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(pick, raw)));
        for (int r = 0; r < nr; r++) {
            const __m512i dot = _mm512_dpbusd_epi32(base, _mm512_loadu_si512(xq + (r * nb + b) * BLOCK), q);
            const __m512 dx = _mm512_loadu_ps(xd + (r * nb + b) * 8);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dx), dw, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r * stride] = hsum(acc[r]);
}
#else
/* AVX2: one block per iteration; |q| times x with q's sign, in pairs of int16 then int32 lanes. */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *w, int64_t nb, const uint8_t *xq,
                                                         const float *xd, const int nr, float *out, int64_t stride) {
    __m256 acc[GROUP];
    for (int r = 0; r < GROUP; r++) acc[r] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * BLOCK_BYTES;
        _mm_prefetch((const char *) (blk + PREFETCH), _MM_HINT_T0);
        const __m256i q = _mm256_loadu_si256((const __m256i *) (blk + 2));
        const __m256i aq = _mm256_sign_epi8(q, q);
        uint16_t h;
        memcpy(&h, blk, 2);
        const float dw = _cvtsh_ss(h);
        for (int r = 0; r < nr; r++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *) (xq + (r * nb + b) * BLOCK));
            const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(x, q)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xd[(r * nb + b) * 8]), acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r * stride] = hsum8(acc[r]);
}
#endif

/* out[r * n_vocab + v] = W[v] . x[r] for Q8_0 rows W [n_vocab, n_embd] (n_embd a multiple of 64). */
int tokensteer_q8_0_logits(const uint8_t *w, int64_t n_vocab, int64_t n_embd, const float *x, int64_t n_rows,
                           float *out, int n_threads) {
    const int64_t nb = n_embd / BLOCK, row_bytes = nb * BLOCK_BYTES;
    if (n_embd % (2 * BLOCK) != 0 || n_rows <= 0) return 1;
    uint8_t *xq = aligned_alloc(64, ((size_t) (n_rows * n_embd) + 63) / 64 * 64);
    float *xd = aligned_alloc(64, ((size_t) (n_rows * nb * 8) * sizeof(float) + 63) / 64 * 64);
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return 2;
    }
    quantize_rows(x, n_rows, n_embd, xq, xd);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t v = 0; v < n_vocab; v++) {
        for (int64_t r0 = 0; r0 < n_rows; r0 += GROUP) {
            const uint8_t *wv = w + v * row_bytes, *q = xq + r0 * n_embd;
            const float *d = xd + r0 * nb * 8;
            float *o = out + r0 * n_vocab + v;
            switch (n_rows - r0 < GROUP ? n_rows - r0 : GROUP) { /* constant row counts unroll the inner loop */
            case 1: dot_rows(wv, nb, q, d, 1, o, n_vocab); break;
            case 2: dot_rows(wv, nb, q, d, 2, o, n_vocab); break;
            case 3: dot_rows(wv, nb, q, d, 3, o, n_vocab); break;
            default: dot_rows(wv, nb, q, d, GROUP, o, n_vocab); break;
            }
        }
    }
    free(xq);
    free(xd);
    return 0;
}
