// Fused CPU kernels for the model's elementwise steps (issue 13): RMSNorm, RoPE and SwiGLU with
// their backward, AdamW's update and the gradients' sum of squares. Each is one pass over memory where LibTorch runs a chain
// of operators (RMSNorm: 5 forward and about 10 backward, each allocating its result).
//
// The unfused composites stay the reference: the model calls the dispatchers below, which run a
// fused kernel where fused_ops_apply() (a CPU tensor, fp32 or bf16, a CPU with AVX2 + FMA, and
// ANDYLLM_FUSED_OPS not set to 0) and the composite otherwise (CUDA, other dtypes), so the two
// can be compared in one build (tests/model/test_fused_ops.cpp: values and gradients). On CUDA
// with LibTorch 2.x, RMSNorm and AdamW use LibTorch's own fused ops instead
// (tests/model/test_fused_ops_gpu.cpp compares them with the composites on the GPU).
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace andy {

// Whether the fused CPU kernels run for tensors like `x`.
bool fused_ops_apply(const at::Tensor& x);

// How many threads an at::parallel_for in our CPU kernels (these, the decode attention, the
// cross-entropy, int8 and bf16 products) spreads over from the calling thread: at::get_num_threads()
// where they were compiled with OpenMP (CMake's ANDYLLM_OPENMP: LibTorch's OpenMP runtime is
// GCC's libgomp.so.1), 1 otherwise (at::parallel_for is a header: without _OPENMP it runs the
// whole range on the caller).
int kernel_threads();

// weight * (x / sqrt(mean(x^2, -1) + eps)), normalised in fp32 and rounded to x's dtype before
// the scale, as transformers' LlamaRMSNorm. x [..., D]; weight [D].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rms_norm_unfused(const at::Tensor& x, const at::Tensor& weight, double eps);
// The same for a bf16 / fp16 x with an fp32 weight (the reduced-precision residual stream), the
// result in x's dtype: rms_norm(x, the weight cast to x's dtype, differentiably). On a GPU that is
// LibTorch's fused rms_norm (an RMSNorm kernel of our own with the fp32 weight was slower there:
// docs/PERFORMANCE.md).
at::Tensor rms_norm_in_dtype(const at::Tensor& x, const at::Tensor& weight, double eps);

// Training's residual step of a pre-norm block: h = x + delta and rms_norm(h, weight, eps), both
// differentiable. For fp32 CPU tensors (fused kernels on) one pass over each row forward, and
// the gradient h gets from the residual stream added into the norm's input gradient within the
// norm's backward pass (separate ops leave that sum to autograd, a pass of its own); the same
// values as the two ops. The two ops otherwise.
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                               double eps);

// Inference's residual step of a pre-norm block (vLLM's fused_add_rms_norm): residual += delta
// in place, then rms_norm(residual, weight, eps), in one pass over each row. For fp32 CPU
// tensors (fused kernels on) with no gradient to track; returns an undefined tensor, touching
// nothing, otherwise. The values equal those of the two ops.
at::Tensor add_rms_norm_fp32_(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps);

// silu(gate) * up (the LLaMA MLP's gate), elementwise.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);
at::Tensor swiglu_unfused(const at::Tensor& gate, const at::Tensor& up);

// Rotary embedding (rotate-half convention, as apply_rope) of x [B, T, H, d] with cos/sin
// [B, T, d]; returns [B, T, H, d].
at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_bthd_unfused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// [T, S] bool, true where query i (at position q_offset + i) may see key j (j <= q_offset + i).
at::Tensor causal_mask(int64_t t, int64_t s, int64_t q_offset, const at::Device& device);

// Attention's probabilities: softmax(scale * scores) along the last dim with causal masking,
// scores [..., T, S] of T queries at positions q_offset.. against S keys (query i sees keys
// 0..q_offset + i); computed in fp32, returned in scores' dtype. One pass forward and one
// backward where the composite runs a scale, a masked fill, the softmax and a cast, each with
// its backward.
at::Tensor causal_softmax(const at::Tensor& scores, double scale, int64_t q_offset);
at::Tensor causal_softmax_unfused(const at::Tensor& scores, double scale, int64_t q_offset);

// Causal self-attention of whole sequences (queries and keys at positions 0..T-1) on the CPU in
// fp32: q [B, T, H, d], k and v [B, T, H_kv, d], contiguous (the projections' own layout, so
// nothing is transposed or copied), H a multiple of H_kv; returns [B, T, H, d], differentiable.
// Each query head works against its kv head (GQA without repeated keys). Queries go in row
// blocks of kCausalBlockRows, each multiplied only by the keys it sees: the blocks above the
// diagonal, half the products of long sequences, are never computed (as flash attention skips
// them). Products through oneDNN's sgemm, the causal softmax fused. Where
// causal_attention_cpu_applies (fused kernels on, oneDNN's sgemm present, CPU fp32 tensors of
// those shapes, no autocast); attention() uses it then, its explicit products otherwise.
constexpr int64_t kCausalBlockRows = 64;
bool causal_attention_cpu_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
at::Tensor causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// One AdamW step of one parameter (decoupled weight decay, bias corrections bc1/bc2 given), on
// the gradient times grad_scale (gradient clipping's factor, applied here instead of in a pass
// of its own; the gradient itself is left as it is):
// p *= 1 - lr * weight_decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps). Fused where param, grad and moments are
// contiguous fp32 CPU tensors, LibTorch's in-place operators otherwise.
struct AdamWHyper {
  double lr = 0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0, bc1 = 1, bc2 = 1;
  double grad_scale = 1;
};
void adamw_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& exp_avg_sq, const AdamWHyper& h);
void adamw_update_unfused(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                          at::Tensor& exp_avg_sq, const AdamWHyper& h);

// The same step for a group of parameters sharing `h` (the trainer's decay / no-decay groups),
// at optimizer step `step` (h.bc1 = 1 - beta1^step, h.bc2 likewise). On CUDA with LibTorch 2.1+
// (and ANDYLLM_FUSED_OPS not 0): LibTorch's multi-tensor AdamW, a few kernel launches for the
// whole group instead of about ten per parameter (it leaves the divided gradient in `grads`);
// adamw_update per parameter otherwise.
void adamw_update_group(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const AdamWHyper& h, int64_t step);

// sum(g^2) in double: the gradient norm's part, and a finite value exactly when every element
// is finite (an inf or NaN makes it non-finite; fp32 squares cannot overflow a double). One
// pass over a contiguous fp32 CPU tensor, in fixed chunks summed in order (the same result at
// any thread count); the composite (to double, square, sum: three passes, two allocations)
// otherwise.
double sum_of_squares(const at::Tensor& g);
double sum_of_squares_unfused(const at::Tensor& g);

}  // namespace andy
