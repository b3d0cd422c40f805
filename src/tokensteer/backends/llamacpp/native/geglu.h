/* The spliced GEGLU op: gelu(a) * b over llama.cpp's threads (included by matmul.c). */

/* gelu(a) * b, gelu by the tanh formula ggml uses: x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)),
 * with exp as 2^n * p(f) (n whole, |f| <= 1/2, p to 7 terms: relative error ~1e-7). ggml itself
 * looks gelu up in a table of fp16 inputs, so the two differ by up to ~1e-3. */
static inline __m512 gelu(__m512 x) {
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 z = _mm512_mul_ps(_mm512_set1_ps(-2.f * 0.7978845608f), _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x));
    const __m512 t = _mm512_mul_ps(_mm512_min_ps(z, _mm512_set1_ps(88.f)), _mm512_set1_ps(1.4426950409f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    const __m512 e = _mm512_scalef_ps(p, n); /* exp(z) */
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

void tokensteer_geglu_slice(const float *a, const float *b, float *y, int64_t n, int ith, int nth) {
    const int64_t per = ((n + nth - 1) / nth + 15) / 16 * 16, i0 = per * ith < n ? per * ith : n, i1 = i0 + per < n ? i0 + per : n;
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(gelu(_mm512_loadu_ps(a + i)), _mm512_loadu_ps(b + i)));
    if (i < i1) {
        const __mmask16 m = (__mmask16) ((1u << (i1 - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(gelu(_mm512_maskz_loadu_ps(m, a + i)), _mm512_maskz_loadu_ps(m, b + i)));
    }
}

static void run_geglu(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void) userdata;
    tokensteer_geglu_slice(dst->src[0]->data, dst->src[1]->data, dst->data, ggml_nelements(dst), ith, nth);
}
