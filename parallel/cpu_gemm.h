// fp32 matrix products on CPU through oneDNN's sgemm (`dnnl_sgemm`) where the process has it.
//
// Debian's LibTorch 1.13 sends fp32 matmuls to OpenBLAS, whose 0.3.21 runs its AVX2 (Haswell)
// kernels on this project's AVX-512 build machine: about 125 GFLOP/s per core, where oneDNN's
// sgemm (the oneDNN LibTorch already links, libdnnl.so.2, used by LibTorch for bf16) reaches
// about 240 at training shapes and 1.2-1.6x at 32-row decode shapes, to the same fp32 precision
// (docs/PERFORMANCE.md). The linear layers (and the tied LM head) and the attention's two
// batched products (LibTorch 1.13's explicit attention) use it for CPU fp32 tensors;
// everything else (other devices, bf16 / fp16, autocast regions, a LibTorch without an exported
// `dnnl_sgemm`, ANDYLLM_CPU_GEMM=blas) goes through at::linear as before.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace andy {

// Whether fp32 CPU linears go through oneDNN: `dnnl_sgemm` is in the process and
// ANDYLLM_CPU_GEMM is not "blas". Decided once.
bool cpu_gemm_enabled();

// y = x W^T for x [..., K] and W [N, K], differentiable in both (dx = dy W, dW = dy^T x).
// W's packed copy when packed weights are on (see below) and no gradient is needed; oneDNN's
// sgemm for CPU fp32 tensors outside autocast when cpu_gemm_enabled(); at::linear otherwise.
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight);

// [x W_0^T, x W_1^T, ...] for x [..., K] and weights W_i [N_i, K] (the q/k/v and gate/up
// projections of one input): with gradients, CPU fp32 outside autocast and oneDNN's sgemm, one
// autograd node whose backward sums dx = sum_i dy_i W_i in sgemm's output instead of autograd
// adding the separate products' input gradients in passes of their own; otherwise cpu_linear of
// each. Values and gradients as cpu_linear's to fp32 rounding.
std::vector<at::Tensor> cpu_linear_group(const at::Tensor& x, at::TensorList weights);

// Packed weights (inference on CPU; serve.cpu_packed_weights): when on, cpu_linear without
// gradients multiplies fp32 and bf16 inputs of up to 64 rows (batched decode steps; larger
// prefill products keep the unpacked paths) by a copy of the weight packed once (on first use,
// again if the weight changed in place). fp32 weights go into the column panels of our own kernel
// (parallel/cpu_panel_gemm.h) where the CPU has AVX-512: it prefetches the next panel while it
// computes one, so 32-row products of weights that are not in the cache run 1.0-2.4x as fast as
// oneDNN's packed sgemm (most for small ones), and each row's result is the same whatever the other rows of the
// product (up to 64). Elsewhere fp32, and bf16 always, go through oneDNN's packed-GEMM
// functions (libdnnl.so.2's gemm_pack.hpp, looked up at run time): 32-row products 1.0-1.7x
// (fp32) and 2-2.5x (bf16, against LibTorch's bf16 linear) as fast as unpacked. Costs one more
// copy of every weight used so. Off by default; turning it off frees the packs. A process with
// neither (no AVX-512 and PyTorch's own builds, which link oneDNN statically;
// ANDYLLM_CPU_GEMM=blas) keeps the unpacked paths. fp32 results equal the unpacked products to
// fp32 rounding.
void set_cpu_packed_weights(bool on);
bool cpu_packed_weights_available(at::ScalarType dtype);
// Whether packed weights are on and fp32 products go to the panel kernel (AVX-512): then a single
// fp32 row without gradient goes there too (linear_rows), so that a decode step's rows give the
// same bits alone as in a batch.
bool cpu_fp32_panels_on();
// Bytes held by the packs of live weights.
int64_t cpu_packed_weight_bytes();

// a [..., M, K] times b [..., K, N] over the same batch dims (no broadcasting), as at::matmul,
// differentiable in both. Each operand's last two dims may be a transposed view (k.transpose(-2,
// -1)): it is read as it lies. oneDNN's sgemm per batch entry under the same conditions as
// cpu_linear; at::matmul otherwise.
at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b);

// y = W x for one bf16 row x [K] (any leading dims of size 1) and bf16 W [N, K], as at::linear
// rounds it: products summed in fp32, the result rounded to bf16. Reads the weights once, two
// bytes each, with AVX2 (8 weights per load, 4 rows at a time) where the CPU has it; no autograd
// (inference). The decode step of one sequence of a bf16 model (serve.dtype = bf16): LibTorch
// 1.13's bf16 matrix-vector product rounds partial sums to bf16, and oneDNN's bf16 product runs
// a single row at a third of memory speed.
at::Tensor cpu_bf16_gemv(const at::Tensor& x, const at::Tensor& weight);

// Row-major C[M, N] = op(A) op(B) + beta C, op transposing when asked (A is [M, K] or,
// transposed, [K, M]; B is [K, N] or [N, K]). Requires cpu_gemm_enabled().
void cpu_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc, float beta = 0.0f);

}  // namespace andy
