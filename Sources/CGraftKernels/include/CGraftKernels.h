// C kernels that need CPU intrinsics or a C library: bfloat16 conversion (AVX-512 BF16 when the CPU has it, a
// portable fallback otherwise) and bfloat16 matrix products through oneDNN. Selected at run time; every
// function here works on any x86-64 or other CPU, only faster where the instructions exist.
#ifndef CGRAFT_KERNELS_H
#define CGRAFT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// The OpenBLAS core Graft switched OpenBLAS to when loading ("SkylakeX", "Haswell", "Sandybridge"), or NULL when
/// it left OpenBLAS's own choice alone. OpenBLAS picks kernels by CPU model; a model newer than the OpenBLAS build
/// gets its SSE3 fallback, 4x slower, so Graft then picks by the CPU's features (unless OPENBLAS_CORETYPE is set).
const char *cgraft_blas_core(void);

/// Nonzero when the CPU executes AVX-512 BF16 dot products (vdpbf16ps), the instructions that make bfloat16
/// products about twice as fast as float32 ones; bfloat16 mode is still correct without them, only not faster.
int cgraft_cpu_has_avx512_bf16(void);

/// Nonzero when bfloat16 matrix products are available (oneDNN created its CPU engine); 0 otherwise, and then
/// cgraft_bf16_matmul must not be called.
int cgraft_bf16_matmul_available(void);

/// Rounds `n` floats to bfloat16 (round to nearest, ties to even; NaN stays NaN) into `dst`.
void cgraft_f32_to_bf16(const float *src, uint16_t *dst, size_t n);

/// Widens `n` bfloat16 values to float (exact).
void cgraft_bf16_to_f32(const uint16_t *src, float *dst, size_t n);

/// `C[m×n] = A[m×k] · op(B) (+ C when accumulate)` in bfloat16 with float32 accumulation and output, row-major
/// with leading dimensions `lda`, `ldb`, `ldc`. `B` is stored `[n, k]` when `trans_b` (so op(B) = Bᵀ, the Linear
/// layer's `x · Wᵀ`), else `[k, n]`. Runs on the calling thread only (callers split large products over their own
/// threads). Returns 0, or a oneDNN status (nonzero) when the product could not run.
int cgraft_bf16_matmul(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb,
                       int trans_b, float *c, int64_t ldc, int accumulate);

/// A low-rank update's down projection for one activation row: `h[k] = Σ_j a[k·in + j] · x[j]` for `k < rank`
/// (`a` is `[rank, in]`, row-major). Runs on the calling thread.
void cgraft_lora_down(const float *x, int64_t in, const float *a, int64_t rank, float *h);

/// A low-rank update's up projection into output rows `begin <= o < end`: `y[o] += scale · Σ_k b[o·rank + k] · h[k]`
/// (`b` is `[out, rank]`, row-major). Runs on the calling thread.
void cgraft_lora_up(const float *h, int64_t rank, const float *b, int64_t begin, int64_t end, float scale, float *y);

/// Rounds each row of the row-major `[rows, cols]` matrix `src` to symmetric int8: `dst[r·cols + c] ·
/// scales[r]` ≈ `src[r·cols + c]`, with `scales[r] = max_c |src[r·cols + c]| / 127` (NaN for a row holding a
/// non-finite value, so the products it enters come out NaN as they would from the float32 row).
void cgraft_int8_rows(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales);

/// Rows of int8 columns in a block, in cgraft_int8_columns_blocked's layout.
#define CGRAFT_LORA_UP_BLOCK 16

/// The columns of the row-major `[rows, cols]` matrix `src` (B of a LoRA, `[out, rank]`) rounded to symmetric int8,
/// one scale per column (as cgraft_int8_rows rounds rows), laid out for cgraft_lora_up_int8: blocks of
/// CGRAFT_LORA_UP_BLOCK rows, each `[cols / 2][CGRAFT_LORA_UP_BLOCK][2]` (columns in pairs, an odd count padded with
/// a zero column), so a range of rows is one contiguous stream. `dst` holds cgraft_int8_blocked_count(rows, cols)
/// values (cgraft_int8_blocked_index gives each one's place); rows past `rows` are zeros.
void cgraft_int8_columns_blocked(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales);

/// Values cgraft_int8_columns_blocked writes for a `[rows, cols]` matrix.
int64_t cgraft_int8_blocked_count(int64_t rows, int64_t cols);

/// Where cgraft_int8_columns_blocked puts the value of row `row`, column `col` of a matrix with `cols` columns.
int64_t cgraft_int8_blocked_index(int64_t row, int64_t col, int64_t cols);

/// cgraft_lora_down with `a` in int8 (cgraft_int8_rows): `h[k] = scales[k] · Σ_j a[k·in + j] · x[j]`, for
/// fast-mode decoding. Runs on the calling thread.
void cgraft_lora_down_int8(const float *x, int64_t in, const int8_t *a, const float *scales, int64_t rank, float *h);

/// The fast mode's down projection against activations quantized by cgraft_q8_quantize_rows (`q`: `in` int8
/// values, `d`: one scale per block of 32) and `a` in int8 (cgraft_int8_rows): `h[k] = scales[k] · Σ_b d[b] ·
/// Σ_{j in b} a[k·in + j] · q[j]`, integer sums per block (AVX2 or a portable loop, the same bits either way). Writes
/// nothing unless `in` is a multiple of 32. Runs on the calling thread.
void cgraft_lora_down_q8(const int8_t *q, const float *d, int64_t in, const int8_t *a, const float *scales,
                         int64_t rank, float *h);

/// The portable loop of cgraft_lora_down_q8 for one component (unscaled), whatever the CPU: for tests that the
/// vector path gives the same bits. NaN unless `in` is a multiple of 32.
float cgraft_lora_down_q8_portable_dot(const int8_t *q, const float *d, int64_t in, const int8_t *a);

/// The fast mode's up projection into output rows `begin <= o < end`, from B in int8 (cgraft_int8_columns_blocked of
/// B, a scale per rank component): `g = h ⊙ scales` is rounded to int16 with one scale, `q[k] = rint(g[k] / d)` for
/// `d = max_k |g[k]| / 32767`, then `y[o] += (scale · d) · Σ_k b[o][k] · q[k]`, the sum exact in integers, so each
/// `y[o]` gets the same bits whichever range computes it. A non-finite g makes every output in the range NaN.
void cgraft_lora_up_int8(const float *h, int64_t rank, const int8_t *bt, const float *scales, int64_t begin,
                         int64_t end, float scale, float *y);

/// The decode-factor-copies scope open on the calling thread (an opaque object of the Swift layer), or NULL.
void *cgraft_factor_copies_scope(void);

/// Opens `scope` (NULL: none) on the calling thread; see cgraft_factor_copies_scope.
void cgraft_set_factor_copies_scope(void *scope);

/// The ggml block formats cgraft_ggml_rows_product multiplies directly (ggml's type ids).
enum { CGRAFT_GGML_Q4_1 = 3, CGRAFT_GGML_Q8_0 = 8 };

/// `y[i·ldy + r] += Σ_k W[r, k] · x[i·ldx + k]` for output rows `r0 <= r < r1` and input rows `i < m`, where `W`
/// is a `[rows, cols]` matrix of `type` blocks whose row `r` starts at `w + row_order[r] · row_bytes` (at
/// `w + r · row_bytes` when `row_order` is NULL), multiplied straight from its blocks (AVX2 + FMA where the CPU has
/// them, AVX-512F on CPUs that have it). `block_scales` is NULL or the matrix's table from cgraft_ggml_block_scales
/// (by storage row), which the AVX-512 kernels read instead of the scales inside the blocks. `scratch` holds
/// `m · cols / 32` floats. Runs on the calling thread. Returns 0, or -1 (and touches nothing) for another type,
/// `cols` not a multiple of 32 or `m < 1`.
int cgraft_ggml_rows_product(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order,
                             const uint16_t *block_scales, int64_t r0, int64_t r1, int64_t cols, const float *x,
                             int64_t ldx, int64_t m, float *y, int64_t ldy, float *scratch);

/// Caps the kernels cgraft_ggml_rows_product picks: 0 the portable loop, 1 AVX2 + FMA + F16C, 2 (the default)
/// AVX-512F where the CPU has each (for the int8 products: 1 AVX2, 2 AVX-512 VNNI); tests run every level the
/// CPU supports.
void cgraft_ggml_limit_kernels(int level);

/// The fast mode's activations: each of `m` rows of `cols` floats (`cols` a multiple of 32; row `i` at
/// `x + i·ldx`) quantized per block of 32 to int8 with one scale: `q[i·cols + k] = round(x / d)`,
/// `scales[i·cols/32 + b] = d = max|x| / 127` over the block, and `sums[…] = d·Σq` (the Q4_1 offset term's).
void cgraft_q8_quantize_rows(const float *x, int64_t ldx, int64_t m, int64_t cols, int8_t *q, float *scales,
                             float *sums);

/// cgraft_ggml_rows_product on activations quantized by cgraft_q8_quantize_rows: integer dot products of each
/// int8 block with the weight's Q4_1 / Q8_0 block, scaled per block (AVX-512 VNNI, AVX2 or portable, see
/// cgraft_ggml_int8_kernel_level). Same rows, layout and return value as cgraft_ggml_rows_product.
/// `block_scales` is NULL or the matrix's table from cgraft_ggml_block_scales (by storage row), which the VNNI
/// kernels read instead of the scales inside the blocks.
int cgraft_ggml_rows_product_q8(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order,
                                const uint16_t *block_scales, int64_t r0, int64_t r1, int64_t cols, const int8_t *q,
                                const float *scales, const float *sums, int64_t m, float *y, int64_t ldy);

/// The number of halves cgraft_ggml_block_scales writes for a `[rows, cols]` matrix of `type` (per row: the
/// blocks' scales, then for Q4_1 their minimums), or -1 for another type or `cols` not a multiple of 32.
int64_t cgraft_ggml_block_scales_count(int type, int64_t rows, int64_t cols);

/// Copies the half-precision scales (and Q4_1 minimums) of every block of `rows` storage rows into `table`
/// (cgraft_ggml_block_scales_count halves), contiguous per row so the int8 kernels load 16 at a time. Returns
/// 0, or -1 as cgraft_ggml_block_scales_count.
int cgraft_ggml_block_scales(int type, const uint8_t *w, int64_t rows, int64_t row_bytes, int64_t cols, uint16_t *table);

/// The bytes cgraft_ggml_tiles writes for a `[rows, cols]` Q4_1 or Q8_0 matrix (as many as its blocks, rows
/// rounded up to 16), or -1 for another type, `rows < 1` or `cols` not a positive multiple of 32.
int64_t cgraft_ggml_tiles_size(int type, int64_t rows, int64_t cols);

/// Repacks a Q4_1 or Q8_0 matrix (`rows` rows of `row_bytes`; row `k` stored at `row_order[k]` when given) into
/// tiles of 16 rows interleaved block by block (cgraft_ggml_tiles_size bytes at `tiles`), the layout of
/// cgraft_ggml_tiles_product_q8. Returns 0, or -1 (writing nothing) as cgraft_ggml_tiles_size.
int cgraft_ggml_tiles(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order, int64_t rows,
                      int64_t cols, uint8_t *tiles);

/// cgraft_ggml_rows_product_q8 from a tiled matrix: adds `x · Wᵀ` for output rows `r0 ..< r1` into `y` (row `i`
/// at `y + i·ldy`), `x` quantized by cgraft_q8_quantize_rows. One vpdpbusd serves sixteen weight rows (AVX-512
/// VNNI; AVX2's vpmaddubsw serves eight, and a portable loop gives the same floats without either). A row's value
/// is the same in any range and for any `m`. Returns 0, or -1 (touching nothing) for bad sizes or rows.
int cgraft_ggml_tiles_product_q8(int type, const uint8_t *tiles, int64_t rows, int64_t r0, int64_t r1, int64_t cols,
                                 const int8_t *q, const float *scales, const float *sums, int64_t m, float *y,
                                 int64_t ldy);

/// The int8 kernels cgraft_ggml_rows_product_q8 runs now: 0 portable, 1 AVX2, 2 AVX-512 VNNI (the CPU's best,
/// capped by cgraft_ggml_limit_kernels).
int cgraft_ggml_int8_kernel_level(void);

/// GELU (erf form) of `n` floats: `y = x/2 · (1 + erf(x/√2))`. The activations below run the widest vector unit
/// the CPU has and give the same floats as GraftTensor's Swift kernels.
void cgraft_gelu(const float *x, float *y, int64_t n);

/// GELU's input gradient: `dx = g · (Φ(x) + x · φ(x))`.
void cgraft_gelu_backward(const float *x, const float *g, float *dx, int64_t n);

/// SiLU of `n` floats: `y = x · σ(x)`.
void cgraft_silu(const float *x, float *y, int64_t n);

/// SiLU's input gradient: `dx = g · σ(x) · (1 + x · (1 − σ(x)))`.
void cgraft_silu_backward(const float *x, const float *g, float *dx, int64_t n);

/// SwiGLU of `n` pairs: `y = silu(gate) · up`.
void cgraft_swiglu(const float *gate, const float *up, float *y, int64_t n);

/// SwiGLU's gradients from the output gradient `g`: `dup = g · silu(gate)`, `dgate = g · up · silu'(gate)`;
/// either output may be NULL.
void cgraft_swiglu_backward(const float *gate, const float *up, const float *g, float *dgate, float *dup, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
