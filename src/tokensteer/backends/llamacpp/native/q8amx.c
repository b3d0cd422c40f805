/* The Q8_0 output layer (see q8head.c) on AMX tiles: one tile instruction multiplies up to 16 rows
 * by 16 weight rows over a 32-value block, so the cost per extra row is a few float operations per
 * block instead of four vector instructions per 64 values. The matrix is repacked once into the
 * tiles' layout (16 weight rows x 32 values per 512-byte tile, then the 16 rows' block scales).
 * Activations are quantised like llama.cpp's Q8_0 (32 values, scale amax/127, rounded half away
 * from zero). A row's logits never depend on the other rows in the call: each tile row holds one
 * row's products, and its float sums run in the same order for any row count. setup.py builds it
 * where the compiler takes AMX; on CPUs without AMX, or where Linux refuses tile state, callers use
 * q8head.c. */
#if !(defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__F16C__))
#error "needs AMX (TILE, INT8) and AVX-512"
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK 32       /* values per Q8_0 block */
#define BLOCK_BYTES 34 /* fp16 scale + 32 int8 */
#define N 16           /* weight rows per tile */
#define M 16           /* most activation rows per tile */
#define TILE_BYTES 512 /* 8 rows of 64 bytes: 4 consecutive values of each of 16 weight rows */
#define UNIT (TILE_BYTES + N * 4) /* one tile and its 16 scales */

/* Ask Linux for the tile state (needed once per process); 0 when AMX may be used. */
int tokensteer_amx_enable(void) {
    return (int) syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

/* The tiles of W [n_vocab, n_embd] (Q8_0): for each group of 16 rows, for each block, the tile and
 * the rows' scales as floats; rows past n_vocab are zero. NULL when memory runs out. */
void *tokensteer_q8_0_pack(const uint8_t *w, int64_t n_vocab, int64_t n_embd, int n_threads) {
    const int64_t nb = n_embd / BLOCK, groups = (n_vocab + N - 1) / N;
    uint8_t *p = aligned_alloc(64, (size_t) (groups * nb * UNIT));
    if (!p) return NULL;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *tile = p + (g * nb + b) * UNIT;
            float *scale = (float *) (tile + TILE_BYTES);
            for (int n = 0; n < N; n++) {
                const int64_t v = g * N + n;
                if (v >= n_vocab) {
                    for (int k = 0; k < BLOCK; k++) tile[(k / 4) * 64 + n * 4 + k % 4] = 0;
                    scale[n] = 0.f;
                    continue;
                }
                const uint8_t *blk = w + (v * nb + b) * BLOCK_BYTES;
                uint16_t h;
                memcpy(&h, blk, 2);
                scale[n] = _cvtsh_ss(h);
                for (int k = 0; k < BLOCK; k++) tile[(k / 4) * 64 + n * 4 + k % 4] = blk[2 + k];
            }
        }
    return p;
}

void tokensteer_q8_0_free(void *p) { free(p); }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tiles: 0 the products (m x 16 int32), 1 the rows' block (m x 32 int8), 2 the weights' block */
static void configure(int m) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = (uint8_t) m, c.colsb[0] = 64;
    c.rows[1] = (uint8_t) m, c.colsb[1] = BLOCK;
    c.rows[2] = TILE_BYTES / 64, c.colsb[2] = 64;
    _tile_loadconfig(&c);
}

/* One group of 16 weight rows against m rows (m fixed per instantiation, so acc stays in registers). */
static inline __attribute__((always_inline)) void group(const uint8_t *tiles, int64_t nb, const int8_t *xq, int64_t n_embd,
                                                        const float *xd, int m, float *out, int64_t n_vocab, int64_t v0) {
    __m512 acc[M];
    int32_t prod[M * N] __attribute__((aligned(64)));
    for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *tile = tiles + b * UNIT;
        _tile_zero(0);
        _tile_loadd(1, xq + b * BLOCK, n_embd);
        _tile_loadd(2, tile, 64);
        _tile_dpbssd(0, 1, 2);
        _tile_stored(0, prod, 64);
        const __m512 ws = _mm512_load_ps((const float *) (tile + TILE_BYTES));
        for (int r = 0; r < m; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(prod + r * N)), _mm512_mul_ps(ws, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
    }
    const __mmask16 keep = v0 + N <= n_vocab ? 0xFFFF : (__mmask16) ((1u << (n_vocab - v0)) - 1);
    for (int r = 0; r < m; r++) _mm512_mask_storeu_ps(out + r * n_vocab + v0, keep, acc[r]);
}

/* out[r * n_vocab + v] = W[v] . x[r] from the tiles of tokensteer_q8_0_pack (n_embd a multiple of 32). */
int tokensteer_q8_0_logits_packed(const uint8_t *tiles, int64_t n_vocab, int64_t n_embd, const float *x, int64_t n_rows,
                                  float *out, int n_threads) {
    const int64_t nb = n_embd / BLOCK, groups = (n_vocab + N - 1) / N;
    if (n_embd % BLOCK != 0 || n_rows <= 0) return 1;
    int8_t *xq = aligned_alloc(64, ((size_t) (n_rows * n_embd) + 63) / 64 * 64);
    float *xd = aligned_alloc(64, ((size_t) (n_rows * nb) * sizeof(float) + 63) / 64 * 64);
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return 2;
    }
    for (int64_t i = 0; i < n_rows * nb; i++) { /* llama.cpp's quantize_row_q8_0 */
        const float *s = x + i * BLOCK;
        float amax = 0.f;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(s[j]));
        const float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        xd[i] = d;
        for (int j = 0; j < BLOCK; j++) xq[i * BLOCK + j] = (int8_t) roundf(s[j] * id);
    }
    for (int64_t r0 = 0; r0 < n_rows; r0 += M) {
        const int m = (int) (n_rows - r0 < M ? n_rows - r0 : M);
#pragma omp parallel num_threads(n_threads)
        {
            configure(m);
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *t = tiles + g * nb * UNIT;
                const int8_t *q = xq + r0 * n_embd;
                const float *d = xd + r0 * nb;
                float *o = out + r0 * n_vocab;
                switch (m) { /* constant row counts keep the accumulators in registers */
                case 1: group(t, nb, q, n_embd, d, 1, o, n_vocab, g * N); break;
                case 2: group(t, nb, q, n_embd, d, 2, o, n_vocab, g * N); break;
                case 3: group(t, nb, q, n_embd, d, 3, o, n_vocab, g * N); break;
                case 4: group(t, nb, q, n_embd, d, 4, o, n_vocab, g * N); break;
                default: group(t, nb, q, n_embd, d, m, o, n_vocab, g * N); break;
                }
            }
            _tile_release();
        }
    }
    free(xq);
    free(xd);
    return 0;
}
