/* The matrix products of llama.cpp's transformer blocks, in our own kernels.
 *
 * llama.cpp multiplies a quantised weight matrix by each activation row separately, decoding every
 * weight block again for every row, so a step of 4 rows costs nearly twice a step of 1. Here each
 * matrix is repacked once into panels of 16 weight rows (panels.h): one AVX-512 VNNI instruction
 * multiplies 4 values of 16 weight rows by 4 values of a row, a decoded weight vector meets up to 8
 * rows, and a block is scaled in floats once per 16 weight rows. Rows never interact, so a row gets
 * the same result alone or in a batch.
 *
 * `tokensteer_splice` runs in llama.cpp's eval callback before a graph is computed: it turns each
 * matrix product it can do (Q8_0, Q5_0, Q4_K or Q6_K weights) into a ggml custom op that
 * calls `tokensteer_matmul_slice`, so llama.cpp's own threads run it in place, with no extra
 * synchronisation. Activations are quantised to 8 bits per value with one scale per 32 values
 * (like llama.cpp's Q8_0). Needs AVX-512 F/BW/DQ/VL/VNNI/VBMI; setup.py builds it where the compiler
 * takes those, and on other CPUs (or where a matrix cannot be packed: no memory) llama.cpp keeps
 * its own products. */
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

/* out[r * ldo + o] = W[o] . x[r * ldx ...] for o in this slice (ith of nth, whole panels) of the
 * n_out weight rows, from w's panels. Each thread quantises every row itself (a few microseconds),
 * so slices need no synchronisation. Returns 1 for an unsupported type or shape, 2 when memory
 * runs out, 3 when w was never packed. */
int tokensteer_matmul_slice(int type, const uint8_t *w, int64_t n_out, int64_t n, const float *x, int64_t n_rows,
                            int64_t ldx, float *out, int64_t ldo, int ith, int nth) {
    if (!panel_type(type) || n % (k_quant(type) ? 256 : 32) != 0 || n_rows <= 0) return 1;
    const uint8_t *pn = panels_of(w, type);
    return pn ? panel_slice(type, pn, n_out, n, x, n_rows, ldx, out, ldo, ith, nth) : 3;
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

/* Called for each node before llama.cpp computes a graph: a matrix product these kernels do
 * becomes a custom op running them, and so does a GEGLU. True when the node is (now) ours. */
bool tokensteer_splice(struct ggml_tensor *t) {
    if (t->op != GGML_OP_MUL_MAT && t->op != GGML_OP_CUSTOM && t->op != GGML_OP_GLU) return false;
    if (!prepare()) return false;
    if (splice_geglu(t)) return true;
    if (t->op == GGML_OP_GLU) return false;
    const bool ours = t->op == GGML_OP_CUSTOM;
    if (ours && memcmp(t->op_params, matmul_params, sizeof(matmul_params)) != 0) return false; /* someone else's */
    if (ours) return true; /* a graph llama.cpp reuses */
    const struct ggml_tensor *w = t->src[0], *x = t->src[1];
    if (!w || !x || !panel_type(w->type) || x->type != GGML_TYPE_F32 || t->type != GGML_TYPE_F32) return false;
    if (w->ne[2] != 1 || w->ne[3] != 1 || x->ne[2] != 1 || x->ne[3] != 1) return false;
    if (!ggml_is_contiguous(w) || !w->buffer || !ggml_backend_buffer_is_host(w->buffer) || !f32_host(t) || x->nb[0] != sizeof(float)) return false;
    if (!x->buffer || !ggml_backend_buffer_is_host(x->buffer)) return false;
    if (!prepare_panels(w->type, w->data, w->ne[1], w->ne[0])) return false; /* another shape, or no memory */
    t->op = GGML_OP_CUSTOM;
    memcpy(t->op_params, matmul_params, sizeof(matmul_params));
    return true;
}
