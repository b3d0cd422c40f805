/* The ggml a library was compiled against, as "<version> <commit> <header hash>" (setup.py passes
 * it in). The loader compares it with the ggml llama-cpp-python loads and refuses a mismatch, since
 * the kernels read ggml's structs directly. */
#ifndef TOKENSTEER_GGML
#error "build through setup.py, which records the ggml this library is compiled against"
#endif
const char *tokensteer_ggml_built(void) { return TOKENSTEER_GGML; }
