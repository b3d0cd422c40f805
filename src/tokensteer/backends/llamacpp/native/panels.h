/* Panels: Q8_0, Q5_0, Q4_K and Q6_K weight matrices repacked once, so that one AVX-512 VNNI instruction
 * multiplies 4 values of 16 weight rows by 4 values of one activation row. A 32-value block's
 * products of 16 weight rows then sum in integers, and each block is scaled in floats once per 16
 * weight rows instead of once per weight row; up to 8 activation rows meet each decoded vector.
 *
 * A matrix is packed the first time tokensteer_splice meets it and kept for the process, keyed by
 * its address. tokensteer_weights_moved (called whenever a model is loaded) makes the next splice
 * check each kept matrix against a hash of the bytes now at its address, so a new model placed
 * where an old one was never reads the old one's panels. Included by matmul.c. */
#include <pthread.h>
#include <sys/mman.h>

#define PANEL 16        /* weight rows per panel */
#define PANEL_ROWS 8    /* activation rows that meet each decoded weight vector */
#define PREFETCH_UNITS 8 /* blocks ahead a panel slice asks for: with several rows the products stall on memory otherwise */
#define MAX_PACKED 4096 /* matrices a process keeps packed (products of more stay llama.cpp's) */
#define HUGE_PAGE ((size_t) 2 << 20)
#define HUGE_FROM ((size_t) 16 << 20) /* panels this large are aligned to huge pages (smaller ones would waste most of one) */

typedef struct {
    const uint8_t *w;    /* the weights' address */
    int type;
    int64_t n_out, n;
    uint64_t hash;       /* of the weights' bytes when packed */
    int gen;             /* the load generation in which the hash was last checked */
    uint8_t *packed;
} packed_matrix;

static packed_matrix packed[MAX_PACKED];
static int n_packed, load_gen;
static pthread_mutex_t pack_lock = PTHREAD_MUTEX_INITIALIZER;

void tokensteer_weights_moved(void) { __atomic_add_fetch(&load_gen, 1, __ATOMIC_ACQ_REL); }

#define MAX_PANEL_VALUES ((int64_t) 64 << 20) /* larger matrices (output layers) stay llama.cpp's: sessions
                                                 run theirs in q8head, so a packed copy would double it */

static bool panel_type(int type) {
    return type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K;
}
static bool nibbles(int type) { return type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q4_K; }
static bool k_quant(int type) { return type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K; }

/* bytes of one (panel, 32-value block): Q8_0 8 vectors of 64 bytes and 16 fp16 scales; Q5_0 4
 * vectors of two nibbles, 8 masks of high bits and 16 fp16 scales; Q4_K 4 vectors of two nibbles,
 * 16 float scales and 16 float minimums; Q6_K 8 vectors, 16 fp16 super-block scales d and the int8
 * scales of the block's two 16-value halves; all padded to 64 bytes */
static int64_t panel_unit(int type) { return nibbles(type) ? 384 : 576; }
static int64_t scales_at(int type) { return type == GGML_TYPE_Q5_0 ? 320 : type == GGML_TYPE_Q4_K ? 256 : 512; }
/* the offset of the unsigned values: a weight is scale * (u - off); Q4_K's is its minimum, whose
 * term needs each block's sum of activations, so its rows are summed as if the offset were 1 */
static int value_offset(int type) {
    return type == GGML_TYPE_Q8_0 ? 128 : type == GGML_TYPE_Q5_0 ? 16 : type == GGML_TYPE_Q4_K ? 1 : 32;
}
/* bytes of a weight row of n values in the file */
static size_t file_bytes(int type, int64_t n) {
    switch (type) {
    case GGML_TYPE_Q8_0: return (size_t) (n / 32 * 34);
    case GGML_TYPE_Q5_0: return (size_t) (n / 32 * 22);
    case GGML_TYPE_Q4_K: return (size_t) (n / 256 * 144);
    default: return (size_t) (n / 256 * 210);
    }
}

/* Q4_K's scale and minimum of sub-block j (0..7): 6-bit numbers packed in 12 bytes */
static void q4k_scale_min(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63, *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static uint64_t weights_hash(const uint8_t *w, size_t size) {
    uint64_t h = 0x9E3779B97F4A7C15ull, v;
    size_t i = 0;
    for (; i + 8 <= size; i += 8) {
        memcpy(&v, w + i, 8);
        h = (h ^ v) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 29;
    }
    for (; i < size; i++) h = (h ^ w[i]) * 0x100000001B3ull;
    return h;
}

/* Value k of a block (Q8_0, Q5_0: 0..31 of its 32; Q6_K: 0..255 of its super-block) as the
 * unsigned u of value scale * (u - off). */
static inline uint8_t unsigned_value(int type, const uint8_t *blk, int k) {
    if (type == GGML_TYPE_Q8_0) return blk[2 + k] ^ 0x80;
    if (type == GGML_TYPE_Q4_K) { /* per 64 values, 32 bytes: low nibbles the first 32, high the next */
        const int l = k % 64;
        const uint8_t b = blk[16 + 32 * (k / 64) + l % 32];
        return l < 32 ? b & 15 : b >> 4;
    }
    if (type == GGML_TYPE_Q6_K) { /* 128 bytes of low nibbles, 64 of 2-bit pairs, per 128 values */
        const int half = k / 128, i = k % 128, l = i % 32, quarter = i / 32;
        const uint8_t ql = blk[64 * half + l + 32 * (quarter & 1)], qh = blk[128 + 32 * half + l];
        return (uint8_t) (((quarter < 2 ? ql : ql >> 4) & 15) | (((qh >> (2 * quarter)) & 3) << 4));
    }
    uint32_t high;
    memcpy(&high, blk + 2, 4);
    const uint8_t nib = k < 16 ? blk[6 + k] & 15 : blk[6 + k - 16] >> 4;
    return (uint8_t) (nib | (((high >> k) & 1) << 4));
}

static uint8_t *pack(int type, const uint8_t *w, int64_t n_out, int64_t n) {
    const int64_t nb = n / 32, panels = (n_out + PANEL - 1) / PANEL, unit = panel_unit(type);
    const int64_t row_bytes = (int64_t) file_bytes(type, n);
    size_t size = (size_t) (panels * nb * unit);
    const size_t align = size >= HUGE_FROM ? HUGE_PAGE : 64;
    size = (size + align - 1) / align * align;
    uint8_t *p = aligned_alloc(align, size);
    if (!p) return NULL;
    if (align == HUGE_PAGE) madvise(p, size, MADV_HUGEPAGE); /* a long stream reads faster without a TLB miss every 4 KB */
    memset(p, 0, size);
    for (int64_t g = 0; g < panels; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *u = p + (g * nb + b) * unit;
            for (int r = 0; r < PANEL && g * PANEL + r < n_out; r++) {
                const bool k6 = type == GGML_TYPE_Q6_K, k4 = type == GGML_TYPE_Q4_K;
                const uint8_t *blk = w + (g * PANEL + r) * row_bytes + (k_quant(type) ? b / 8 * (row_bytes / (nb / 8)) : b * (row_bytes / nb));
                if (k4) { /* float scale d * sc and minimum dmin * m of this sub-block */
                    uint16_t d[2];
                    int sc, m;
                    memcpy(d, blk, 4);
                    q4k_scale_min(blk + 4, (int) (b % 8), &sc, &m);
                    const float fs = _cvtsh_ss(d[0]) * (float) sc, fm = _cvtsh_ss(d[1]) * (float) m;
                    memcpy(u + 256 + 4 * r, &fs, 4);
                    memcpy(u + 320 + 4 * r, &fm, 4);
                } else {
                    memcpy(u + scales_at(type) + 2 * r, blk + (k6 ? 208 : 0), 2);
                }
                if (k6) /* the int8 scales of this block's two halves */
                    for (int h = 0; h < 2; h++) u[scales_at(type) + 32 + 16 * h + r] = blk[192 + 2 * (b % 8) + h];
                for (int k = 0; k < 32; k++) {
                    const uint8_t x = unsigned_value(type, blk, k_quant(type) ? 32 * (int) (b % 8) + k : k);
                    const int grp = k / 4, lane = 4 * r + k % 4;
                    if (!nibbles(type)) {
                        u[grp * 64 + lane] = x;
                    } else { /* group 2j in the low nibbles of vector j, 2j + 1 in the high; Q5_0's bit 4 in mask grp */
                        u[(grp / 2) * 64 + lane] |= (uint8_t) ((x & 15) << (4 * (grp & 1)));
                        if (x & 16) u[256 + grp * 8 + lane / 8] |= (uint8_t) (1u << (lane % 8));
                    }
                }
            }
        }
    return p;
}

/* The panels of matrix w, packing it (or repacking it, when other bytes now sit at its address)
 * as needed; NULL where it is not packed. Called from the splice, before a graph runs. */
static const uint8_t *prepare_panels(int type, const uint8_t *w, int64_t n_out, int64_t n) {
    if (!panel_type(type) || n % (k_quant(type) ? 256 : 32) || n_out * n > MAX_PANEL_VALUES) return NULL;
    const int gen = __atomic_load_n(&load_gen, __ATOMIC_ACQUIRE);
    const size_t size = (size_t) n_out * file_bytes(type, n);
    pthread_mutex_lock(&pack_lock);
    packed_matrix *m = NULL;
    for (int i = 0; i < n_packed; i++)
        if (packed[i].w == w) m = &packed[i];
    if (m && m->gen != gen) {
        const bool same = m->type == type && m->n_out == n_out && m->n == n && m->hash == weights_hash(w, size);
        if (!same) { /* another matrix now lives here: its model was freed, so nothing reads the old panels */
            free(m->packed);
            m->packed = NULL;
        }
        m->gen = gen;
    }
    if ((!m && n_packed < MAX_PACKED) || (m && !m->packed)) {
        uint8_t *p = pack(type, w, n_out, n);
        if (p) {
            if (!m) m = &packed[n_packed];
            *m = (packed_matrix){w, type, n_out, n, weights_hash(w, size), gen, p};
            if (m == &packed[n_packed]) __atomic_store_n(&n_packed, n_packed + 1, __ATOMIC_RELEASE);
        }
    }
    const uint8_t *out = m ? m->packed : NULL;
    pthread_mutex_unlock(&pack_lock);
    return out;
}

/* The panels kept for w (no packing), or NULL: what a slice reads while the graph runs. */
static const uint8_t *panels_of(const uint8_t *w, int type) {
    const int n = __atomic_load_n(&n_packed, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++)
        if (packed[i].w == w && packed[i].type == type) return packed[i].packed;
    return NULL;
}

/* One panel against m activation rows (m fixed per instantiation: the sums stay in registers). */
static inline __attribute__((always_inline)) void panel_rows(int type, const uint8_t *pn, int64_t nb, const int8_t *xq,
                                                             const float *xd, const int32_t *xc, int m, float *out,
                                                             int64_t ldo, int keep) {
    __m512 acc[PANEL_ROWS];
    for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    const int64_t unit = panel_unit(type), n = nb * 32;
    const __m512i lo4 = _mm512_set1_epi8(15), c16 = _mm512_set1_epi8(16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pn + b * unit;
        for (int64_t l = 0; l < unit; l += 64) _mm_prefetch((const char *) (blk + PREFETCH_UNITS * unit + l), _MM_HINT_T0);
        __m512i u[8];
        if (!nibbles(type)) {
            for (int g = 0; g < 8; g++) u[g] = _mm512_load_si512(blk + g * 64);
        } else {
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_load_si512(blk + j * 64);
                u[2 * j] = _mm512_and_si512(v, lo4), u[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
                if (type == GGML_TYPE_Q5_0) {
                    __mmask64 lo, hi;
                    memcpy(&lo, blk + 256 + 16 * j, 8);
                    memcpy(&hi, blk + 256 + 16 * j + 8, 8);
                    u[2 * j] = _mm512_mask_add_epi8(u[2 * j], lo, u[2 * j], c16);
                    u[2 * j + 1] = _mm512_mask_add_epi8(u[2 * j + 1], hi, u[2 * j + 1], c16);
                }
            }
        }
        if (type == GGML_TYPE_Q4_K) { /* d * sc * (q . x) - dmin * m * sum(x) */
            const __m512 sc = _mm512_load_ps((const float *) (blk + 256)), mn = _mm512_load_ps((const float *) (blk + 320));
            for (int r = 0; r < m; r++) {
                const int32_t *x4 = (const int32_t *) (xq + r * n + b * 32);
                __m512i s = _mm512_setzero_si512();
                for (int g = 0; g < 8; g++) s = _mm512_dpbusd_epi32(s, u[g], _mm512_set1_epi32(x4[g]));
                const float dx = xd[r * nb + b], sum = (float) -(xc[2 * (r * nb + b)] + xc[2 * (r * nb + b) + 1]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sc, _mm512_set1_ps(dx)), acc[r]);
                acc[r] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(dx * sum), acc[r]);
            }
            continue;
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (blk + scales_at(type))));
        if (type == GGML_TYPE_Q6_K) { /* a scale per 16 values: each half sums and scales apart */
            const __m512 d0 = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *) (blk + 544))))),
                         d1 = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *) (blk + 560)))));
            for (int r = 0; r < m; r++) {
                const int32_t *x4 = (const int32_t *) (xq + r * n + b * 32);
                __m512i s0 = _mm512_set1_epi32(xc[2 * (r * nb + b)]), s1 = _mm512_set1_epi32(xc[2 * (r * nb + b) + 1]);
                for (int g = 0; g < 4; g++) {
                    s0 = _mm512_dpbusd_epi32(s0, u[g], _mm512_set1_epi32(x4[g]));
                    s1 = _mm512_dpbusd_epi32(s1, u[g + 4], _mm512_set1_epi32(x4[g + 4]));
                }
                const __m512 dx = _mm512_set1_ps(xd[r * nb + b]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, dx), acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(d1, dx), acc[r]);
            }
            continue;
        }
        for (int r = 0; r < m; r++) {
            const int32_t *x4 = (const int32_t *) (xq + r * n + b * 32);
            __m512i s = _mm512_set1_epi32(xc[2 * (r * nb + b)] + xc[2 * (r * nb + b) + 1]);
            for (int g = 0; g < 8; g++) s = _mm512_dpbusd_epi32(s, u[g], _mm512_set1_epi32(x4[g]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
        }
    }
    const __mmask16 k = keep >= PANEL ? 0xFFFF : (__mmask16) ((1u << keep) - 1);
    for (int r = 0; r < m; r++) _mm512_mask_storeu_ps(out + r * ldo, k, acc[r]);
}

/* Quantise activation rows per 32 values: int8 values, scales, and -off times the sum of each
 * 16-value half (the unsigned weights' offset). Returns the scratch it wrote, or NULL when memory
 * runs out. */
static int8_t *quantize_panel_rows(const float *x, int64_t n_rows, int64_t ldx, int64_t n, int off, float **xd, int32_t **xc) {
    const int64_t nb = n / 32;
    int8_t *q = room((size_t) (n_rows * n) + (size_t) (n_rows * nb) * (sizeof(float) + 2 * sizeof(int32_t)));
    if (!q) return NULL;
    *xd = (float *) (q + n_rows * n);
    *xc = (int32_t *) (*xd + n_rows * nb);
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            const float *s = x + r * ldx + b * 32;
            const __m512 a = _mm512_loadu_ps(s), c = _mm512_loadu_ps(s + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
            const float d = amax / 127.f;
            const __m512 id = _mm512_set1_ps(d ? 1.f / d : 0.f);
            /* |values| <= 127 by the scale, so the int8 saturation never bites and the halves' sums
               come from the int32 vectors (a loop over the stored bytes chains through memory) */
            const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, id)), ic = _mm512_cvtps_epi32(_mm512_mul_ps(c, id));
            int8_t *dst = q + r * n + b * 32;
            _mm_storeu_si128((__m128i *) dst, _mm512_cvtsepi32_epi8(ia));
            _mm_storeu_si128((__m128i *) (dst + 16), _mm512_cvtsepi32_epi8(ic));
            (*xd)[r * nb + b] = d;
            (*xc)[2 * (r * nb + b)] = -off * _mm512_reduce_add_epi32(ia);
            (*xc)[2 * (r * nb + b) + 1] = -off * _mm512_reduce_add_epi32(ic);
        }
    return q;
}

/* This thread's share (ith of nth, whole panels) of out[r * ldo + o] = W[o] . x[r] from panels. */
static int panel_slice(int type, const uint8_t *pn, int64_t n_out, int64_t n, const float *x, int64_t n_rows, int64_t ldx,
                       float *out, int64_t ldo, int ith, int nth) {
    float *xd;
    int32_t *xc;
    const int8_t *xq = quantize_panel_rows(x, n_rows, ldx, n, value_offset(type), &xd, &xc);
    if (!xq) return 2;
    const int64_t nb = n / 32, panels = (n_out + PANEL - 1) / PANEL, unit = panel_unit(type);
    for (int64_t g = panels * ith / nth; g < panels * (ith + 1) / nth; g++) {
        const int keep = (int) (n_out - g * PANEL < PANEL ? n_out - g * PANEL : PANEL);
        for (int64_t r0 = 0; r0 < n_rows; r0 += PANEL_ROWS) {
            const uint8_t *p = pn + g * nb * unit;
            const int8_t *q = xq + r0 * n;
            float *o = out + r0 * ldo + g * PANEL;
            const int m = (int) (n_rows - r0 < PANEL_ROWS ? n_rows - r0 : PANEL_ROWS);
#define PANEL_CASE(T)                                                                                  \
    switch (m) { /* constant row counts unroll */                                                      \
    case 1: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 1, o, ldo, keep); break;           \
    case 2: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 2, o, ldo, keep); break;           \
    case 3: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 3, o, ldo, keep); break;           \
    case 4: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 4, o, ldo, keep); break;           \
    case 5: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 5, o, ldo, keep); break;           \
    case 6: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 6, o, ldo, keep); break;           \
    case 7: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, 7, o, ldo, keep); break;           \
    default: panel_rows(T, p, nb, q, xd + r0 * nb, xc + 2 * r0 * nb, PANEL_ROWS, o, ldo, keep); break; \
    }
            if (type == GGML_TYPE_Q8_0) {
                PANEL_CASE(GGML_TYPE_Q8_0)
            } else if (type == GGML_TYPE_Q5_0) {
                PANEL_CASE(GGML_TYPE_Q5_0)
            } else if (type == GGML_TYPE_Q4_K) {
                PANEL_CASE(GGML_TYPE_Q4_K)
            } else {
                PANEL_CASE(GGML_TYPE_Q6_K)
            }
#undef PANEL_CASE
        }
    }
    return 0;
}
