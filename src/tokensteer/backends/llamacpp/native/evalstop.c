/* llama.cpp's eval callback for our contexts, in C: llama.cpp calls it for every node of every
 * step, hundreds of times a step, which is slow through a Python callback.
 * While `on`, it asks for the final norm's output ("result_norm"), copies it to `dst` and stops the
 * graph there, so the output layer is skipped; while off it asks for nothing. Mirrors Capture._call.
 * With `splice` set, it first offers every node to it (native/matmul.c), which may turn a matrix
 * product into our own kernel's op before llama.cpp computes the graph. */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "ggml_built.h"

struct ggml_tensor;
const char * ggml_get_name(const struct ggml_tensor * tensor);
int64_t ggml_nelements(const struct ggml_tensor * tensor);
bool ggml_is_contiguous(const struct ggml_tensor * tensor);
void * ggml_get_data(const struct ggml_tensor * tensor);

typedef struct {
    int32_t on;      /* in: 1 to capture on this decode */
    int32_t status;  /* out: 0 not seen, 1 copied, 2 seen in a layout we do not copy (graph ran on) */
    int64_t n;       /* out: floats copied */
    int64_t cap;     /* in: room in dst, in floats */
    float * dst;     /* in */
    bool (*splice)(struct ggml_tensor *);  /* in: NULL, or native/matmul.c's tokensteer_splice */
} capture_state;

bool tokensteer_capture(struct ggml_tensor * t, bool ask, void * user) {
    capture_state * s = (capture_state *) user;
    if (ask && s->splice && s->splice(t)) {
        return false;  /* our kernel computes it in place: nothing to look at */
    }
    if (!s->on) {
        return !ask;
    }
    bool hit = strcmp(ggml_get_name(t), "result_norm") == 0;
    if (ask || !hit) {
        return ask ? hit : true;
    }
    int64_t n = ggml_nelements(t);
    /* a ggml_tensor starts with its type; 0 is GGML_TYPE_F32 */
    if (*(const int32_t *) t != 0 || !ggml_is_contiguous(t) || n > s->cap) {
        s->status = 2;
        return true;
    }
    memcpy(s->dst, ggml_get_data(t), (size_t) n * sizeof(float));
    s->n = n;
    s->status = 1;
    return false;
}
