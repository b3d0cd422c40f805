/* The matrix products of llama.cpp's transformer blocks for a few rows, in our own kernels.
 *
 * llama.cpp multiplies a quantised weight matrix by each activation row separately, decoding every
 * weight block again for every row, so a step of 4 rows costs nearly twice a step of 1. Here each weight
 * block is decoded once into 64 unsigned bytes and then meets every row (up to 4) with one AVX-512
 * VNNI instruction per row. Rows never interact, so a row gets the same result alone or in a batch.
 *
 * `tokensteer_splice` runs in llama.cpp's eval callback before a graph is computed: it turns each
 * matrix product it can do (Q8_0, Q5_0, Q4_K or Q6_K weights, few rows) into a ggml custom op that
 * calls `tokensteer_matmul_slice`, so llama.cpp's own threads run it in place, with no extra
 * synchronisation. Activations are quantised to 8 bits per value with one scale per 32 values
 * (like llama.cpp's Q8_0). Needs AVX-512 F/BW/DQ/VL/VNNI/VBMI; setup.py builds it where the compiler
 * takes those, and on other CPUs llama.cpp keeps its own products. */
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
      defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__F16C__))
#error "needs AVX-512 (F, BW, DQ, VL, VNNI, VBMI) and F16C"
#endif
#include <immintrin.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "ggml_built.h"

#define GROUP 4        /* rows that share one decoded weight row */
#define PREFETCH 1024  /* bytes ahead of the weight block being read */

/* One row's activations, per 64 values in the weight type's order: 64 int8 (x / d rounded), each
 * 32-bit lane's scale d (16 floats), and each lane's offset correction -off * sum(x) (16 int32).
 * `sums` holds d * sum(x) per 32 values in natural order (Q4_K's minimum terms). */
typedef struct {
    int8_t q[64];
    float d[16];
    int32_t corr[16];
} chunk;

typedef struct {
    int type, off;        /* ggml type; weights decode to unsigned u with value u - off */
    int64_t unit, bytes;  /* a row is whole blocks of `unit` values in `bytes` bytes */
    int64_t step;         /* a row's length must be a multiple of this (blocks are read in pairs) */
} kind;

static bool kind_of(int type, kind *k) {
    switch (type) {
    case GGML_TYPE_Q8_0: *k = (kind){type, 128, 32, 34, 64}; return true;
    case GGML_TYPE_Q5_0: *k = (kind){type, 16, 32, 22, 64}; return true;
    case GGML_TYPE_Q4_K: *k = (kind){type, 0, 256, 144, 256}; return true;
    case GGML_TYPE_Q6_K: *k = (kind){type, 32, 256, 210, 256}; return true;
    default: return false;
    }
}

/* Q4_K keeps sub-blocks (0 1), (2 3) in the low and high nibbles of the same bytes: its activation
 * blocks go in the order 0 2 1 3 within each 128 values, so one load yields two chunks. */
static inline int64_t source_block(int type, int64_t b) {
    if (type != GGML_TYPE_Q4_K) return b;
    const int64_t i = b & 3;
    return (b & ~(int64_t) 3) | (i == 1 ? 2 : i == 2 ? 1 : i);
}

static void quantize_row(const float *x, int64_t n, const kind *k, chunk *out, float *sums) {
    const __m512i off = _mm512_set1_epi8((char) k->off);
    for (int64_t b = 0; b < n / 32; b++) {
        const float *s = x + 32 * source_block(k->type, b);
        const __m512 a = _mm512_loadu_ps(s), c = _mm512_loadu_ps(s + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        const float d = amax / 127.f;
        const __m512 id = _mm512_set1_ps(d ? 1.f / d : 0.f);
        const __m128i qa = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, id)));
        const __m128i qc = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(c, id)));
        chunk *ch = out + b / 2;
        const int half = (int) (b & 1);
        _mm_storeu_si128((__m128i *) (ch->q + 32 * half), qa);
        _mm_storeu_si128((__m128i *) (ch->q + 32 * half + 16), qc);
        _mm256_storeu_ps(ch->d + 8 * half, _mm256_set1_ps(d));
        const __m256i q = _mm256_set_m128i(qc, qa);
        /* lane sums of q, and -off * sum per lane (dpbusd of the constant against q) */
        const __m256i corr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm512_castsi512_si256(off), q));
        _mm256_storeu_si256((__m256i *) (ch->corr + 8 * half), corr);
        if (sums) {
            const __m256i lanes = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), q);
            sums[source_block(k->type, b)] = d * (float) _mm512_reduce_add_epi32(_mm512_zextsi256_si512(lanes));
        }
    }
}

/* every row's sum over one chunk of 64 decoded weights u with per-lane weight scales ws */
#define ROWS(nr, with_corr)                                                                                    \
    for (int r = 0; r < (nr); r++) {                                                                          \
        const chunk *c = rows[r] + kk;                                                                        \
        const __m512i init = (with_corr) ? _mm512_loadu_si512(c->corr) : _mm512_setzero_si512();            \
        const __m512i dot = _mm512_dpbusd_epi32(init, u, _mm512_loadu_si512(c->q));                          \
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(c->d)), ws, acc[r]); \
    }

static inline __m512 fp16_pair(const uint8_t *a, const uint8_t *b) {
    uint16_t ha, hb;
    memcpy(&ha, a, 2);
    memcpy(&hb, b, 2);
    return _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(ha)), _mm256_set1_ps(_cvtsh_ss(hb)), 1);
}

/* One weight row w against nr rows; out[r * stride] receives row r's product. */
static inline __attribute__((always_inline)) void dot_row(int type, const uint8_t *w, int64_t n, const chunk *const *rows,
                                                          const float *const *sums, int nr, float *out, int64_t stride) {
    __m512 acc[GROUP];
    __m256 accm[GROUP];
    for (int r = 0; r < GROUP; r++) acc[r] = _mm512_setzero_ps(), accm[r] = _mm256_setzero_ps();
    const __m512i lo4 = _mm512_set1_epi8(15);
    if (type == GGML_TYPE_Q8_0) { /* 2 blocks of 34 bytes: fp16 scale, 32 int8 */
        const __m512i flip = _mm512_set1_epi8((char) 0x80);
        for (int64_t kk = 0; kk < n / 64; kk++) {
            const uint8_t *blk = w + kk * 68;
            _mm_prefetch((const char *) (blk + PREFETCH), _MM_HINT_T0);
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) (blk + 2))),
                                                 _mm256_loadu_si256((const __m256i *) (blk + 36)), 1);
            const __m512i u = _mm512_xor_si512(q, flip);
            const __m512 ws = fp16_pair(blk, blk + 34);
            ROWS(nr, 1)
        }
    } else if (type == GGML_TYPE_Q5_0) { /* 2 blocks of 22 bytes: fp16 scale, 32 high bits, 16 bytes of nibbles */
        const __m512i gather = _mm512_set_epi8(43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28,
                                               43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28,
                                               21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                               21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6);
        const __m512i shift = _mm512_set_epi16(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0,
                                               4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i c16 = _mm512_set1_epi8(16);
        const __m512i pick = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                              11, 11, 11, 11, 11, 11, 11, 11, 0, 0, 0, 0, 0, 0, 0, 0);
        for (int64_t kk = 0; kk < n / 64; kk++) {
            const uint8_t *blk = w + kk * 44;
            _mm_prefetch((const char *) (blk + PREFETCH), _MM_HINT_T0);
            const __m512i raw = _mm512_maskz_loadu_epi8(0xFFFFFFFFFFFull, blk); /* 44 bytes, never past the row */
            const __m512i nib = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(gather, raw), shift), lo4);
            uint32_t h0, h1; /* bit j: 16 more for value j of the block */
            memcpy(&h0, blk + 2, 4);
            memcpy(&h1, blk + 24, 4);
            const __m512i u = _mm512_mask_add_epi8(nib, (__mmask64) h0 | ((__mmask64) h1 << 32), nib, c16);
            const __m512 ws = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(pick, raw)));
            ROWS(nr, 1)
        }
    } else if (type == GGML_TYPE_Q4_K) { /* 256 values in 144 bytes: d, dmin, 12 bytes of 6-bit scales and mins, nibbles */
        for (int64_t sb = 0; sb < n / 256; sb++) {
            const uint8_t *blk = w + sb * 144;
            _mm_prefetch((const char *) (blk + PREFETCH), _MM_HINT_T0);
            uint32_t a, b, c;
            memcpy(&a, blk + 4, 4);
            memcpy(&b, blk + 8, 4);
            memcpy(&c, blk + 12, 4);
            const uint32_t sc03 = a & 0x3f3f3f3f, m03 = b & 0x3f3f3f3f;
            const uint32_t sc47 = (c & 0x0f0f0f0f) | (((a >> 6) & 0x03030303) << 4);
            const uint32_t m47 = ((c >> 4) & 0x0f0f0f0f) | (((b >> 6) & 0x03030303) << 4);
            const __m512 sm = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi32((int) m47, (int) m03, (int) sc47, (int) sc03))),
                                            fp16_pair(blk, blk + 2)); /* 8 scales d*sc, then 8 minimums dmin*m */
            const __m256 mins = _mm512_extractf32x8_ps(sm, 1);
            for (int r = 0; r < nr; r++) accm[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(sums[r] + sb * 8), accm[r]);
            for (int h = 0; h < 2; h++) {
                const __m512i q = _mm512_loadu_si512(blk + 16 + 64 * h);
                for (int hi = 0; hi < 2; hi++) {
                    const int64_t kk = sb * 4 + 2 * h + hi;
                    const __m512i u = _mm512_and_si512(hi ? _mm512_srli_epi16(q, 4) : q, lo4);
                    const int s0 = 4 * h + hi; /* sub-blocks s0 and s0 + 2 */
                    const __m512 ws = _mm512_permutexvar_ps(_mm512_set_epi32(s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2,
                                                                             s0, s0, s0, s0, s0, s0, s0, s0), sm);
                    ROWS(nr, 0)
                }
            }
        }
    } else { /* Q6_K: 256 values in 210 bytes: low nibbles, high 2-bit pairs, 16 int8 scales, d */
        const __m512i lo2 = _mm512_set1_epi8(3);
        for (int64_t sb = 0; sb < n / 256; sb++) {
            const uint8_t *blk = w + sb * 210;
            _mm_prefetch((const char *) (blk + PREFETCH), _MM_HINT_T0);
            uint16_t hd;
            memcpy(&hd, blk + 208, 2);
            const __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (blk + 192)))), _mm512_set1_ps(_cvtsh_ss(hd)));
            for (int h = 0; h < 2; h++) {
                const __m512i lq = _mm512_loadu_si512(blk + 64 * h);
                const __m256i hq = _mm256_loadu_si256((const __m256i *) (blk + 128 + 32 * h));
                const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(hq), _mm256_srli_epi16(hq, 2), 1);
                for (int hi = 0; hi < 2; hi++) {
                    const int64_t kk = sb * 4 + 2 * h + hi;
                    const __m512i low = _mm512_and_si512(hi ? _mm512_srli_epi16(lq, 4) : lq, lo4);
                    const __m512i top = _mm512_and_si512(hi ? _mm512_srli_epi16(hh, 4) : hh, lo2);
                    const __m512i u = _mm512_or_si512(low, _mm512_slli_epi16(top, 4));
                    const int g = 4 * (int) (kk & 3); /* 16 values per scale: 4 lanes each */
                    const __m512 ws = _mm512_permutexvar_ps(_mm512_set_epi32(g + 3, g + 3, g + 3, g + 3, g + 2, g + 2, g + 2, g + 2,
                                                                             g + 1, g + 1, g + 1, g + 1, g, g, g, g), sc);
                    ROWS(nr, 1)
                }
            }
        }
    }
    if (type == GGML_TYPE_Q4_K)
        for (int r = 0; r < nr; r++) acc[r] = _mm512_sub_ps(acc[r], _mm512_zextps256_ps512(accm[r]));
    for (int r = 0; r < nr; r++) out[r * stride] = _mm512_reduce_add_ps(acc[r]);
}

/* Scratch for one thread's quantised rows, kept between calls (llama.cpp's threads may live on)
 * and freed when its thread ends (a graph may also run on threads started for it). */
typedef struct {
    void *p;
    size_t size;
} scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *s) {
    free(((scratch *) s)->p);
    free(s);
}

static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static void *room(size_t size) {
    pthread_once(&scratch_once, scratch_init);
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (size > s->size) {
        free(s->p);
        s->p = aligned_alloc(64, (size + 63) / 64 * 64);
        s->size = s->p ? size : 0;
    }
    return s->p;
}

#include "panels.h"

/* Pack matrix w into panels now, as the splice does (for tests); 1 when it is packed. */
int tokensteer_matmul_prepare(int type, const uint8_t *w, int64_t n_out, int64_t n) {
    return prepare_panels(type, w, n_out, n) != NULL;
}

/* out[r * ldo + o] = W[o] . x[r * ldx ...] for o in this slice (ith of nth) of the n_out weight rows.
 * Each thread quantises every row itself (a few microseconds), so slices need no synchronisation.
 * Returns nonzero for an unsupported type or shape, or when memory runs out. */
int tokensteer_matmul_slice(int type, const uint8_t *w, int64_t n_out, int64_t n, const float *x, int64_t n_rows,
                            int64_t ldx, float *out, int64_t ldo, int ith, int nth) {
    kind k;
    if (!kind_of(type, &k) || n % k.step != 0 || n_rows <= 0) return 1;
    const uint8_t *pn = panels_of(w, type);
    if (pn) return panel_slice(type, pn, n_out, n, x, n_rows, ldx, out, ldo, ith, nth);
    const int64_t row_bytes = n / k.unit * k.bytes, n_chunks = n / 64;
    const size_t per_row = (size_t) n_chunks * sizeof(chunk) + (size_t) (n / 32) * sizeof(float) + 2 * sizeof(void *);
    uint8_t *buf = room(per_row * (size_t) n_rows);
    if (!buf) return 2;
    const chunk **rows_all = (const chunk **) buf;
    const float **sums_all = (const float **) (rows_all + n_rows);
    uint8_t *data = (uint8_t *) (sums_all + n_rows);
    const size_t row_data = per_row - 2 * sizeof(void *);
    for (int64_t r = 0; r < n_rows; r++) {
        chunk *c = (chunk *) (data + row_data * (size_t) r);
        float *s = (float *) (c + n_chunks);
        quantize_row(x + r * ldx, n, &k, c, s);
        rows_all[r] = c;
        sums_all[r] = s;
    }
    const int64_t o0 = n_out * ith / nth, o1 = n_out * (ith + 1) / nth;
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *wr = w + o * row_bytes;
        for (int64_t r0 = 0; r0 < n_rows; r0 += GROUP) {
            const chunk *const *rows = rows_all + r0;
            const float *const *sums = sums_all + r0;
            float *po = out + r0 * ldo + o;
            const int nr = n_rows - r0 < GROUP ? (int) (n_rows - r0) : GROUP;
#define CASE(T)                                                     \
    case T:                                                         \
        switch (nr) {                                               \
        case 1: dot_row(T, wr, n, rows, sums, 1, po, ldo); break;   \
        case 2: dot_row(T, wr, n, rows, sums, 2, po, ldo); break;   \
        case 3: dot_row(T, wr, n, rows, sums, 3, po, ldo); break;   \
        default: dot_row(T, wr, n, rows, sums, GROUP, po, ldo); break; \
        }                                                           \
        break;
            switch (type) {
                CASE(GGML_TYPE_Q8_0)
                CASE(GGML_TYPE_Q5_0)
                CASE(GGML_TYPE_Q4_K)
                CASE(GGML_TYPE_Q6_K)
            }
#undef CASE
        }
    }
    return 0;
}

/* the custom op: this thread's share of dst = src0 (weights) x src1 (rows) */
static void run_matmul(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void) userdata;
    const struct ggml_tensor *w = dst->src[0], *x = dst->src[1];
    tokensteer_matmul_slice(w->type, w->data, w->ne[1], w->ne[0], x->data, x->ne[1], (int64_t) (x->nb[1] / sizeof(float)),
                            dst->data, dst->ne[0], ith, nth);
}

#include "geglu.h"

/* ggml's own encodings of "custom op `run_matmul` / `run_geglu`, all threads", each taken from
 * a tensor ggml builds */
static int32_t matmul_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)], geglu_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)];
static int ready; /* 0 not yet, 1 ready, -1 failed */

static bool prepare(void) {
    /* Two threads may race here on first use: both build the same bytes, and `ready` is set only
     * once they are in place (never "failed" while another thread is still building). */
    if (__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) return ready > 0;
    struct ggml_init_params p = {16 * 1024, NULL, true};
    struct ggml_context *ctx = ggml_init(p);
    int ok = 0;
    if (ctx) {
        struct ggml_tensor *a = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 1);
        struct ggml_tensor *m = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, &a, 1, run_matmul, GGML_N_TASKS_MAX, NULL);
        struct ggml_tensor *g = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, &a, 1, run_geglu, GGML_N_TASKS_MAX, NULL);
        if (m && g) {
            memcpy(matmul_params, m->op_params, sizeof(matmul_params));
            memcpy(geglu_params, g->op_params, sizeof(geglu_params));
            ok = 1;
        }
        ggml_free(ctx);
    }
    __atomic_store_n(&ready, ok ? 1 : -1, __ATOMIC_RELEASE);
    return ok;
}

static bool f32_host(const struct ggml_tensor *t) {
    return t && t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) && t->buffer && ggml_backend_buffer_is_host(t->buffer);
}

/* GEGLU of two separate tensors (gelu(a) * b, not swapped): always ours, at any size */
static bool splice_geglu(struct ggml_tensor *t) {
    if (t->op == GGML_OP_CUSTOM) return memcmp(t->op_params, geglu_params, sizeof(geglu_params)) == 0;
    if (t->op != GGML_OP_GLU || ggml_get_glu_op(t) != GGML_GLU_OP_GEGLU || t->op_params[1] != 0) return false;
    const struct ggml_tensor *a = t->src[0], *b = t->src[1];
    if (!f32_host(t) || !f32_host(a) || !f32_host(b) || !ggml_are_same_shape(a, t) || !ggml_are_same_shape(b, t)) return false;
    t->op = GGML_OP_CUSTOM;
    memcpy(t->op_params, geglu_params, sizeof(geglu_params));
    return true;
}

/* Called for each node before llama.cpp computes a graph: a matrix product of at most max_rows
 * rows that these kernels do becomes a custom op running them, and one of ours with more rows (a
 * graph llama.cpp reuses with another limit) goes back to ggml's product; a GEGLU becomes ours.
 * True when the node is (now) ours. */
bool tokensteer_splice(struct ggml_tensor *t, int64_t max_rows) {
    if (t->op != GGML_OP_MUL_MAT && t->op != GGML_OP_CUSTOM && t->op != GGML_OP_GLU) return false;
    if (!prepare()) return false;
    if (splice_geglu(t)) return true;
    if (t->op == GGML_OP_GLU) return false;
    const bool ours = t->op == GGML_OP_CUSTOM;
    if (ours && memcmp(t->op_params, matmul_params, sizeof(matmul_params)) != 0) return false; /* someone else's */
    const struct ggml_tensor *w = t->src[0], *x = t->src[1];
    if (ours && x->ne[1] > max_rows) {
        t->op = GGML_OP_MUL_MAT;
        memset(t->op_params, 0, sizeof(t->op_params));
        return false;
    }
    if (ours) return true;
    kind k;
    if (!w || !x || !kind_of(w->type, &k) || x->type != GGML_TYPE_F32 || t->type != GGML_TYPE_F32) return false;
    if (w->ne[0] % k.step || w->ne[2] != 1 || w->ne[3] != 1 || x->ne[2] != 1 || x->ne[3] != 1 || x->ne[1] > max_rows) return false;
    if (!ggml_is_contiguous(w) || !w->buffer || !ggml_backend_buffer_is_host(w->buffer) || !f32_host(t) || x->nb[0] != sizeof(float)) return false;
    if (!x->buffer || !ggml_backend_buffer_is_host(x->buffer)) return false;
    prepare_panels(w->type, w->data, w->ne[1], w->ne[0]);
    t->op = GGML_OP_CUSTOM;
    memcpy(t->op_params, matmul_params, sizeof(matmul_params));
    return true;
}
