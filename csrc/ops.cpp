// Schemas of the C++ kernels, one TORCH_LIBRARY for the whole extension. Implementations
// live in csrc/cpu/<family>.cpp (TORCH_LIBRARY_IMPL(sparsecore, CPU, m)). The public ops are
// the Python custom ops in the sparsecore/ops package (and sparsecore/linalg.py), which
// dispatch to these.
#include <Python.h>
#include <torch/library.h>

// The module only carries the op registrations below; importing it runs them. The same
// sources build one module per instruction set (_C, _C_avx2, _C_avx512: see setup.py), and
// sparsecore/_ext.py imports exactly one, so the ops are registered once.
#define SPARSECORE_CONCAT2(a, b) a##b
#define SPARSECORE_CONCAT(a, b) SPARSECORE_CONCAT2(a, b)
#define SPARSECORE_STR2(a) #a
#define SPARSECORE_STR(a) SPARSECORE_STR2(a)
extern "C" PyObject* SPARSECORE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, SPARSECORE_STR(TORCH_EXTENSION_NAME),
                                   nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(sparsecore, m) {
  // --- csr (unstructured sparse Linear / Conv2d) ---
  // W (n_rows x n_cols) in CSR: row o keeps col_idx[row_ptr[o]:row_ptr[o+1]] (strictly
  // increasing) with values.
  // `tiling` (from _csr_tiling_cpu, which depends only on the sparsity pattern) lets a call skip
  // re-laying the nonzeros out tile-major; without it each call builds one.
  m.def("_csr_tiling_cpu(Tensor col_idx, Tensor row_ptr, int n_cols) -> Tensor");
  // values laid out in a tiling's order, for callers that reuse them across calls.
  m.def("_csr_tile_values_cpu(Tensor values, Tensor col_idx, Tensor row_ptr, Tensor tiling, "
        "int n_cols) -> Tensor");
  // Y = X W^T for W (n_out x K). The input gradient dX = dY W is the same op on the transposed
  // CSR. tiled_values: _csr_tile_values_cpu(values, ...), when the caller keeps it.
  // Inference may fuse its epilogue: + bias (n_out,) + residual (B, n_out), then act (0: none,
  // 1: ReLU, 2: GELU), and a LayerNorm of x's rows on the way in (ln: weight / bias (K,)).
  m.def("_csr_dsd_cpu(Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor? tiling, "
        "int n_out, Tensor? tiled_values=None, Tensor? bias=None, Tensor? residual=None, "
        "int act=0, bool ln=False, Tensor? ln_weight=None, Tensor? ln_bias=None, "
        "float ln_eps=1e-05) -> Tensor");
  // Inference: two CSR Linear layers in a row, y = act2(W2 act1(W1 x + bias1) + bias2 +
  // residual), the hidden activation kept in the kernel's packed layout.
  m.def("_csr_mlp_cpu(Tensor x, Tensor values1, Tensor col_idx1, Tensor row_ptr1, "
        "Tensor? tiling1, Tensor? tiled_values1, Tensor? bias1, int act1, Tensor values2, "
        "Tensor col_idx2, Tensor row_ptr2, Tensor? tiling2, Tensor? tiled_values2, "
        "Tensor? bias2, Tensor? residual, int act2, bool ln=False, Tensor? ln_weight=None, "
        "Tensor? ln_bias=None, float ln_eps=1e-05) -> Tensor");
  // dvalues[k] = sum_b dy[b, row(k)] * x[b, col_idx[k]] -> (nnz,).
  m.def("_csr_sddmm_cpu(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, Tensor? tiling) "
        "-> Tensor");
  // The dense fallback's halves: W dense from its CSR, and a dense matrix at W's nonzeros.
  m.def("_csr_to_dense_cpu(Tensor values, Tensor col_idx, Tensor row_ptr, int n_cols) -> Tensor");
  m.def("_csr_sample_cpu(Tensor full, Tensor row_ptr, Tensor col_idx) -> Tensor");
  // W^T's values in its CSR order (= values[t_perm]), streamed per column of W.
  m.def("_csr_transpose_values_cpu(Tensor values, Tensor col_idx, Tensor row_ptr, "
        "Tensor t_row_ptr) -> Tensor");
  // Y = X W^T through dense GEMM (W densified into a reused buffer).
  m.def("_csr_dsd_dense_cpu(Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, int n_out) "
        "-> Tensor");
  // Conv2d (groups = 1) with W = weight.view(C_out, C_in*kh*kw) in CSR; the input gradient
  // takes the transposed CSR (C_in*kh*kw x C_out).
  m.def("_csr_conv2d_cpu(Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, "
        "Tensor? tiling, int[] weight_shape, int[] stride, int[] padding, int[] dilation) "
        "-> Tensor");
  m.def("_csr_conv2d_dx_cpu(Tensor dy, Tensor t_values, Tensor t_col_idx, "
        "Tensor t_row_ptr, Tensor? t_tiling, int[] weight_shape, int[] input_hw, int[] stride, "
        "int[] padding, int[] dilation) -> Tensor");
  m.def("_csr_conv2d_dw_cpu(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, "
        "Tensor? tiling, int[] weight_shape, int[] stride, int[] padding, int[] dilation) "
        "-> Tensor");
  // Inference: a conv read from per-sample shifted copies of the input (no im2col), with the
  // epilogue fused: [2x2 max-pool] -> + bias [+ residual] [-> ReLU] (residual: the output's
  // shape).
  m.def("_csr_conv2d_fused_cpu(Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, "
        "int[] weight_shape, int[] padding, int[] dilation, Tensor? bias, Tensor? residual, "
        "bool relu, bool pool, int[] stride=[1, 1], Tensor? plan=None) -> Tensor");
  // What that op derives from the geometry and the sparsity pattern alone (each nonzero's
  // offset in the shifted copies, each row's channel tiles), for inputs (N, C_in, input_hw)
  // of dtype, built once for a caller that keeps it and passes it as `plan` (checked
  // against the call, the pattern by its fingerprint).
  m.def("_csr_conv2d_fused_plan_cpu(Tensor col_idx, Tensor row_ptr, int[] weight_shape, "
        "int[] input_hw, int[] padding, int[] dilation, int[] stride, ScalarType dtype) "
        "-> Tensor");
  // The same with the batch as the vector dimension: activations (C, H, W, N) in memory; the
  // weight's nonzeros in (row, channel tile, tap, channel) order, ci their channels, tap_ptr
  // per (row, tile, tap).
  m.def("_csr_conv2d_chwn_cpu(Tensor x, Tensor values, Tensor ci, Tensor tap_ptr, "
        "int channel_tile, int[] weight_shape, int[] stride, int[] padding, int[] dilation, "
        "Tensor? bias, Tensor? residual, "
        "bool relu, bool pool) -> Tensor");
  // Its weight gradient at the kept positions, in the same tap-major order.
  m.def("_csr_conv2d_chwn_dw_cpu(Tensor dy, Tensor x, Tensor ci, Tensor tap_ptr, "
        "int channel_tile, int[] weight_shape, int[] stride, int[] padding, int[] dilation) "
        "-> Tensor");
  // --- bsr (block-sparse Linear / Conv2d) ---
  // Y = X W^T for a BSR W (n_out x K): block row r keeps blocks p in [row_ptr[r], row_ptr[r+1])
  // at block column col_idx[p]; W_p = blocks[block_idx[p] or p], transposed when trans_blocks
  // (so dX = dY W runs on the transposed structure without copying a block).
  m.def("_bsr_dsd_cpu(Tensor x, Tensor blocks, Tensor col_idx, Tensor row_ptr, Tensor? block_idx, "
        "bool trans_blocks, int n_out) -> Tensor");
  // dW_p = dY[:, rows of block p]^T X[:, columns of block p] -> (nnzb, bs_r, bs_c).
  m.def("_bsr_sddmm_cpu(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, int bs_r, int bs_c) "
        "-> Tensor");
  // Conv2d with the BSR matrix view (n_out, C*kh*kw) of its weight, reading x (B, C, H, W) in
  // place (no im2col matrix) -> (B*Ho*Wo, n_out), rows in (b, oy, ox) order.
  m.def("_bsr_conv2d_cpu(Tensor x, Tensor blocks, Tensor col_idx, Tensor row_ptr, int[2] kernel, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // Its backward, also without an im2col matrix: dx from dy2 (B*Ho*Wo, n_out) through the
  // transposed structure, and the gradient of the kept blocks (nnzb, bs_r, bs_c).
  m.def("_bsr_conv2d_dx_cpu(Tensor dy2, Tensor blocks, Tensor t_col_idx, Tensor t_row_ptr, "
        "Tensor t_perm, int[4] x_shape, int[2] kernel, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  m.def("_bsr_conv2d_dw_cpu(Tensor dy2, Tensor x, Tensor row_ptr, Tensor col_idx, int bs_r, "
        "int bs_c, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // --- attention (csrc/cpu/attention.cpp) ---
  // Inference: softmax(scale q k^T [causal, top-left]) v per (sample, head); q (B, Tq, H, D),
  // k and v (B, Tk, H, D), read in place (last dim contiguous); scale defaults to D^-1/2.
  // -> (B, Tq, H, D) contiguous.
  m.def("_attention_cpu(Tensor q, Tensor k, Tensor v, bool causal, float? scale=None) "
        "-> Tensor");
  // --- threads (csrc/cpu/threads.cpp) ---
  // The work per OpenMP thread below which the kernels run fewer threads (each family's own
  // default while this is 0); returns the previous setting. For tests: small shapes then run
  // the threaded paths.
  m.def("_set_min_work_per_thread(int work) -> int");
  // --- arena (csrc/cpu/arena.cpp) ---
  // The cache of the inference kernels' output memory: free its blocks (returns the bytes
  // freed); the bytes it holds.
  m.def("_arena_release_cpu() -> int");
  m.def("_arena_cached_cpu() -> int");
  // --- linalg (batched SVD / eigh) ---
  // Many small matrices (batch, m, n), float32/float64 (csrc/cpu/linalg.cpp): one-sided
  // Jacobi, and Householder bidiagonalisation + implicit-shift QR. U, Vh are empty when
  // compute_uv is false.
  m.def("_svd_jacobi_cpu(Tensor A, bool compute_uv) -> (Tensor, Tensor, Tensor)");
  m.def("_eigh_jacobi_cpu(Tensor A, bool lower) -> (Tensor, Tensor)");
  m.def("_svd_bidiag_cpu(Tensor A, bool compute_uv) -> (Tensor, Tensor, Tensor)");
  m.def("_eigh_bidiag_cpu(Tensor A, bool lower) -> (Tensor, Tensor)");
}
