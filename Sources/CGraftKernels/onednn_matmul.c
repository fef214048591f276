// bfloat16 matrix products through oneDNN's matmul primitive (Debian's libdnnl, 2.x C API). oneDNN keeps its own
// cache of primitives by descriptor, so asking again for a shape seen before costs a lookup, not a JIT compile.
#include "CGraftKernels.h"
#include <dnnl.h>
#include <pthread.h>

// libgomp, which oneDNN's OpenMP runtime uses: the calling thread's team size for its next parallel region.
extern void omp_set_num_threads(int);

static dnnl_engine_t engine;
static int ready;
static pthread_once_t once = PTHREAD_ONCE_INIT;
// Streams are not thread-safe; each calling thread gets its own (Graft's worker threads live as long as the process).
static __thread dnnl_stream_t stream;

static void setup(void) {
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success) return;
    // oneDNN has bfloat16 matmul kernels only for some ISAs (AVX-512 and newer): ask for one small product's
    // implementation, so a CPU without them reports "unavailable" instead of failing later.
    dnnl_memory_desc_t ad, bd, cd;
    dnnl_dims_t dims = {16, 16};
    dnnl_matmul_desc_t md;
    dnnl_primitive_desc_t pd = NULL;
    if (dnnl_memory_desc_init_by_tag(&ad, 2, dims, dnnl_bf16, dnnl_ab) || dnnl_memory_desc_init_by_tag(&bd, 2, dims, dnnl_bf16, dnnl_ba)
        || dnnl_memory_desc_init_by_tag(&cd, 2, dims, dnnl_f32, dnnl_ab) || dnnl_matmul_desc_init(&md, &ad, &bd, NULL, &cd)
        || dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL)) {
        return;
    }
    dnnl_primitive_desc_destroy(pd);
    ready = 1;
}

int cgraft_bf16_matmul_available(void) {
    pthread_once(&once, setup);
    return ready;
}

int cgraft_bf16_matmul(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb,
                       int trans_b, float *c, int64_t ldc, int accumulate) {
    if (!cgraft_bf16_matmul_available()) return dnnl_runtime_error;
    if (m == 0 || n == 0) return 0;
    dnnl_status_t s;
    if (!stream && (s = dnnl_stream_create(&stream, engine, dnnl_stream_default_flags))) return s;
    // Single-threaded on the calling thread: Graft splits the product over its own threads, so no OpenMP team
    // spins between calls while Graft's other work needs the cores.
    omp_set_num_threads(1);
    dnnl_memory_desc_t ad, bd, cd;
    dnnl_dims_t adims = {m, k}, bdims = {k, n}, cdims = {m, n};
    dnnl_dims_t astrides = {lda, 1}, cstrides = {ldc, 1};
    // B as [k, n]: stored [n, k] row-major (trans_b) it has strides {1, ldb}, else {ldb, 1}.
    dnnl_dims_t bstrides = {trans_b ? 1 : ldb, trans_b ? ldb : 1};
    if ((s = dnnl_memory_desc_init_by_strides(&ad, 2, adims, dnnl_bf16, astrides))) return s;
    if ((s = dnnl_memory_desc_init_by_strides(&bd, 2, bdims, dnnl_bf16, bstrides))) return s;
    if ((s = dnnl_memory_desc_init_by_strides(&cd, 2, cdims, dnnl_f32, cstrides))) return s;
    dnnl_matmul_desc_t md;
    if ((s = dnnl_matmul_desc_init(&md, &ad, &bd, NULL, &cd))) return s;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    if (accumulate) {
        if ((s = dnnl_primitive_attr_create(&attr))) return s;
        if ((s = dnnl_post_ops_create(&ops)) || (s = dnnl_post_ops_append_sum(ops, 1.0f))
            || (s = dnnl_primitive_attr_set_post_ops(attr, ops))) {
            if (ops) dnnl_post_ops_destroy(ops);
            dnnl_primitive_attr_destroy(attr);
            return s;
        }
    }
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_memory_t am = NULL, bm = NULL, cm = NULL;
    s = dnnl_primitive_desc_create(&pd, &md, attr, engine, NULL);
    if (!s) s = dnnl_primitive_create(&prim, pd);
    if (!s) s = dnnl_memory_create(&am, &ad, engine, (void *)a);
    if (!s) s = dnnl_memory_create(&bm, &bd, engine, (void *)b);
    if (!s) s = dnnl_memory_create(&cm, &cd, engine, c);
    if (!s) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
        s = dnnl_primitive_execute(prim, stream, 3, args);
        if (!s) s = dnnl_stream_wait(stream);
    }
    if (am) dnnl_memory_destroy(am);
    if (bm) dnnl_memory_destroy(bm);
    if (cm) dnnl_memory_destroy(cm);
    if (prim) dnnl_primitive_destroy(prim);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (ops) dnnl_post_ops_destroy(ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return s;
}
