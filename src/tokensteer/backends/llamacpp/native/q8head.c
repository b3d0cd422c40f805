/* The output layer of a model whose output matrix is Q8_0 (Gemma 3's tied 262k x 640 embedding):
 * logits = W x for a few rows x.
 *
 * llama.cpp runs this layer per row with a dot-product kernel, so every extra row reads the matrix
 * again, and it has no call that runs the layer alone (a formula's mixed rows need that). Here each row's
 * activations are quantised like llama.cpp's (Q8_0: 32 values, one scale), and the integer dot products
 * run on AVX-512 VNNI or AVX2. With VNNI the matrix is first repacked (tokensteer_q8_0_pack) so that
 * one instruction multiplies 4 values of 16 weight rows by one row's 4 values: a block's 32 products
 * of 16 weight rows sum in integers, and only then is each block scaled in floats, once per 16 weight
 * rows instead of once per weight row; up to 8 rows meet each loaded weight vector. The AVX2 build reads
 * the file's own layout, 4 rows per pass. A row's logits do not depend on the other rows in the call
 * (same operations in the same order), so batched rows equal rows decoded alone, bit for bit. setup.py
 * builds it once per instruction set (the #if below picks the path); on other CPUs callers keep
 * llama.cpp's own output layer. */
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
#include <sys/mman.h>

#define BLOCK 32       /* values per Q8_0 block */
#define BLOCK_BYTES 34 /* fp16 scale + 32 int8 */
#define PREFETCH 1024  /* bytes ahead of the weight block being read */

/* CALL(k) with k a constant equal to m (1 .. 7), else CALL(dflt): a constant row count lets the
 * compiler keep every row's sums in registers and unroll the row loop. */
#define BY_ROWS(m, dflt, CALL)                                                                                 \
    switch (m) {                                                                                               \
    case 1: CALL(1); break;                                                                                    \
    case 2: CALL(2); break;                                                                                    \
    case 3: CALL(3); break;                                                                                    \
    case 4: CALL(4); break;                                                                                    \
    case 5: CALL(5); break;                                                                                    \
    case 6: CALL(6); break;                                                                                    \
    case 7: CALL(7); break;                                                                                    \
    default: CALL(dflt); break;                                                                                \
    }

/* Quantise rows like llama.cpp's quantize_row_q8_0: per block of 32 values, the int8 values (xq),
 * the scale (xd) and -128 times the values' sum (xc, which VNNI's unsigned operand needs). */
static void quantize_rows(const float *x, int64_t n_rows, int64_t n_embd, int8_t *xq, float *xd, int32_t *xc) {
    for (int64_t i = 0; i < n_rows * (n_embd / BLOCK); i++) {
        const float *s = x + i * BLOCK;
        float amax = 0.f;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(s[j]));
        const float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < BLOCK; j++) sum += xq[i * BLOCK + j] = (int8_t) roundf(s[j] * id);
        xd[i] = d;
        xc[i] = -128 * sum;
    }
}

typedef int (*rows_fn)(const uint8_t *w, int64_t n_vocab, int64_t nb, const int8_t *xq, const float *xd, const int32_t *xc,
                       int64_t n_rows, float *out, int n_threads);

/* Quantise x, then run `fn` over the quantised rows; 2 when memory runs out. */
static int with_quantised(rows_fn fn, const uint8_t *w, int64_t n_vocab, int64_t n_embd, const float *x, int64_t n_rows,
                          float *out, int n_threads) {
    const int64_t nb = n_embd / BLOCK;
    int8_t *xq = aligned_alloc(64, ((size_t) (n_rows * n_embd) + 63) / 64 * 64);
    float *xd = aligned_alloc(64, ((size_t) (n_rows * nb) * sizeof(float) + 63) / 64 * 64);
    int32_t *xc = aligned_alloc(64, ((size_t) (n_rows * nb) * sizeof(int32_t) + 63) / 64 * 64);
    int rc = 2;
    if (xq && xd && xc) {
        quantize_rows(x, n_rows, n_embd, xq, xd, xc);
        rc = fn(w, n_vocab, nb, xq, xd, xc, n_rows, out, n_threads);
    }
    free(xq);
    free(xd);
    free(xc);
    return rc;
}

#if VNNI
#define PANEL 16  /* weight rows whose values one vector holds (4 values each) */
#define PACK_ROWS 8 /* rows that meet each loaded weight vector */
#define UNIT 544    /* one block of a panel: 8 vectors and 16 fp16 scales (the file's own 16 x 34 bytes) */
#ifndef PANEL_PREFETCH
#define PANEL_PREFETCH 2048 /* bytes ahead of the weight vector being read */
#endif

/* Bytes of one packed panel: per block, 8 vectors of 64 bytes (values 4g..4g+3 of the panel's 16
 * weight rows, each stored as q + 128), then per block the 16 rows' fp16 scales; padded to 64 bytes. */
static int64_t panel_bytes(int64_t nb) { return nb * UNIT; }

/* W [n_vocab, n_embd] (Q8_0) repacked into panels of 16 weight rows; rows past n_vocab are zero.
 * NULL when memory runs out or n_embd is not whole blocks. Free with tokensteer_q8_0_free. */
void *tokensteer_q8_0_pack(const uint8_t *w, int64_t n_vocab, int64_t n_embd, int n_threads) {
    if (n_embd % BLOCK != 0 || n_vocab <= 0) return NULL;
    const int64_t nb = n_embd / BLOCK, panels = (n_vocab + PANEL - 1) / PANEL, bytes = panel_bytes(nb);
    const size_t huge = (size_t) 2 << 20, size = ((size_t) (panels * bytes) + huge - 1) / huge * huge;
    uint8_t *p = aligned_alloc(huge, size);
    if (!p) return NULL;
    madvise(p, size, MADV_HUGEPAGE); /* a stream this long reads faster without a TLB miss every 4 KB */
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < panels; g++) {
        uint8_t *q = p + g * bytes;
        memset(q, 0, (size_t) bytes);
        for (int n = 0; n < PANEL; n++) {
            const int64_t v = g * PANEL + n;
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *dst = q + b * UNIT + n * 4;
                if (v >= n_vocab) { /* a zero weight row: q = 0, stored as 128 */
                    for (int k = 0; k < BLOCK; k++) dst[(k / 4) * 64 + k % 4] = 128;
                    continue;
                }
                const uint8_t *blk = w + (v * nb + b) * BLOCK_BYTES;
                memcpy(q + b * UNIT + 8 * 64 + n * 2, blk, 2);
                for (int k = 0; k < BLOCK; k++) dst[(k / 4) * 64 + k % 4] = (uint8_t) (blk[2 + k] ^ 0x80);
            }
        }
    }
    return p;
}

void tokensteer_q8_0_free(void *p) { free(p); }

/* One panel against m rows (m fixed per instantiation, so the sums stay in registers). Row r's
 * block b sums (q + 128) . x in int32 lanes, starting from -128 * sum(x) (xc), which leaves q . x. */
static inline __attribute__((always_inline)) void panel(const uint8_t *pn, int64_t nb, const int8_t *xq, int64_t n_embd,
                                                        const float *xd, const int32_t *xc, int m, float *out,
                                                        int64_t n_vocab, int64_t v0) {
    __m512 acc[PACK_ROWS];
    for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pn + b * UNIT;
        __m512i wq[8];
        for (int g = 0; g < 8; g++) {
            _mm_prefetch((const char *) (blk + PANEL_PREFETCH + g * 64), _MM_HINT_T0);
            wq[g] = _mm512_loadu_si512(blk + g * 64); /* every other block starts half-way into a cache line */
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (blk + 8 * 64)));
        for (int r = 0; r < m; r++) {
            const int32_t *x4 = (const int32_t *) (xq + r * n_embd + b * BLOCK);
            __m512i s = _mm512_set1_epi32(xc[r * nb + b]), t = _mm512_setzero_si512(); /* two chains */
            for (int g = 0; g < 8; g += 2) {
                s = _mm512_dpbusd_epi32(s, wq[g], _mm512_set1_epi32(x4[g]));
                t = _mm512_dpbusd_epi32(t, wq[g + 1], _mm512_set1_epi32(x4[g + 1]));
            }
            s = _mm512_add_epi32(s, t);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
        }
    }
    const __mmask16 keep = v0 + PANEL <= n_vocab ? 0xFFFF : (__mmask16) ((1u << (n_vocab - v0)) - 1);
    for (int r = 0; r < m; r++) _mm512_mask_storeu_ps(out + r * n_vocab + v0, keep, acc[r]);
}

static int packed_rows(const uint8_t *packed, int64_t n_vocab, int64_t nb, const int8_t *xq, const float *xd,
                       const int32_t *xc, int64_t n_rows, float *out, int n_threads) {
    const int64_t n_embd = nb * BLOCK, panels = (n_vocab + PANEL - 1) / PANEL, bytes = panel_bytes(nb);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < panels; g++) {
        for (int64_t r0 = 0; r0 < n_rows; r0 += PACK_ROWS) {
            const uint8_t *pn = packed + g * bytes;
            const int8_t *q = xq + r0 * n_embd;
            const float *d = xd + r0 * nb;
            const int32_t *c = xc + r0 * nb;
            float *o = out + r0 * n_vocab;
#define PANEL_CALL(k) panel(pn, nb, q, n_embd, d, c, k, o, n_vocab, g * PANEL)
            BY_ROWS(n_rows - r0 < PACK_ROWS ? n_rows - r0 : PACK_ROWS, PACK_ROWS, PANEL_CALL)
#undef PANEL_CALL
        }
    }
    return 0;
}

/* out[r * n_vocab + v] = W[v] . x[r] from the panels of tokensteer_q8_0_pack. */
int tokensteer_q8_0_logits_packed(const uint8_t *packed, int64_t n_vocab, int64_t n_embd, const float *x, int64_t n_rows,
                                  float *out, int n_threads) {
    if (n_embd % BLOCK != 0 || n_rows <= 0) return 1;
    return with_quantised(packed_rows, packed, n_vocab, n_embd, x, n_rows, out, n_threads);
}
#else
#define GROUP 4 /* rows that share one pass over a weight row */

/* The sum of a vector's 8 lanes. */
static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* AVX2: one block per iteration; |q| times x with q's sign, in pairs of int16 then int32 lanes. */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *w, int64_t nb, const int8_t *xq,
                                                         const float *xd, const int nr, float *out, int64_t stride) {
    __m256 acc[8]; /* BY_ROWS instantiates row counts up to 8; only up to GROUP run */
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
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
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xd[r * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r * stride] = hsum8(acc[r]);
}

static int plain_rows(const uint8_t *w, int64_t n_vocab, int64_t nb, const int8_t *xq, const float *xd, const int32_t *xc,
                      int64_t n_rows, float *out, int n_threads) {
    (void) xc;
    const int64_t n_embd = nb * BLOCK, row_bytes = nb * BLOCK_BYTES;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t v = 0; v < n_vocab; v++) {
        for (int64_t r0 = 0; r0 < n_rows; r0 += GROUP) {
            const uint8_t *wv = w + v * row_bytes;
            const int8_t *q = xq + r0 * n_embd;
            const float *d = xd + r0 * nb;
            float *o = out + r0 * n_vocab + v;
#define DOT_CALL(k) dot_rows(wv, nb, q, d, k, o, n_vocab)
            BY_ROWS(n_rows - r0 < GROUP ? n_rows - r0 : GROUP, GROUP, DOT_CALL)
#undef DOT_CALL
        }
    }
    return 0;
}

/* out[r * n_vocab + v] = W[v] . x[r] for Q8_0 rows W [n_vocab, n_embd] in the file's own layout. */
int tokensteer_q8_0_logits(const uint8_t *w, int64_t n_vocab, int64_t n_embd, const float *x, int64_t n_rows,
                           float *out, int n_threads) {
    if (n_embd % BLOCK != 0 || n_rows <= 0) return 1;
    return with_quantised(plain_rows, w, n_vocab, n_embd, x, n_rows, out, n_threads);
}
#endif
