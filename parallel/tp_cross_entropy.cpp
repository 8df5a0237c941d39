// Vocab-parallel cross-entropy as one autograd function (see tp_cross_entropy.h).
#include "parallel/tp_cross_entropy.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <limits>

#include "core/base/avx2_math.h"
#include "core/base/cuda_kernel_args.h"

#include "core/base/error.h"
#include "parallel/tp_ops.h"

namespace andy {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- fused CPU path ------------------------------------------------------------------------
// Two passes over the logits forward (row max, then sum of exp and the target logit) and one
// backward writing the gradient directly, where the composite below materializes shifted
// logits, their exp and the softmax (three [N, V] tensors kept or allocated per step) and
// clones the softmax again for the gradient.

inline float logit_at(const float* row, int64_t j) { return row[j]; }
inline float logit_at(const c10::BFloat16* row, int64_t j) { return static_cast<float>(row[j]); }

#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <typename T>
void row_max_kernel(const T* logits, int64_t rows, int64_t width, int64_t n_real, float* max) {
  at::parallel_for(0, rows, row_grain(width), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* row = logits + r * width;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n_real; ++j) m = std::max(m, logit_at(row, j));
      max[r] = m;
    }
  });
}

// Per row: sum of exp(l - max) over the real columns, and the target's shifted logit (0 where
// this rank does not own it).
template <typename T>
void sum_exp_kernel(const T* logits, int64_t rows, int64_t width, int64_t n_real, const float* max,
                    const int64_t* local_t, const bool* in_range, float* target, float* sum_exp) {
  at::parallel_for(0, rows, row_grain(width), [&](int64_t b, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(n_real));
    for (int64_t r = b; r < e; ++r) {
      const T* row = logits + r * width;
      for (int64_t j = 0; j < n_real; ++j) buf[j] = logit_at(row, j) - max[r];
      __m256 acc = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= n_real; j += 8) acc = _mm256_add_ps(acc, exp8(_mm256_loadu_ps(buf.data() + j)));
      float s = hsum8_pairs(acc);
      for (; j < n_real; ++j) s += std::exp(buf[j]);
      sum_exp[r] = s;
      target[r] = in_range[r] ? logit_at(row, local_t[r]) - max[r] : 0.0f;
    }
  });
}

// grad = (softmax - onehot(target)) * scale per row; padded columns get 0.
template <typename T>
void ce_grad_kernel(const T* logits, int64_t rows, int64_t width, int64_t n_real, const float* max,
                    const float* sum_exp, const int64_t* local_t, const bool* in_range, const float* scale,
                    T* grad) {
  at::parallel_for(0, rows, row_grain(width), [&](int64_t b, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(n_real));
    for (int64_t r = b; r < e; ++r) {
      const T* row = logits + r * width;
      T* g = grad + r * width;
      const float sc = scale[r], inv = sc / sum_exp[r];
      for (int64_t j = 0; j < n_real; ++j) buf[j] = logit_at(row, j) - max[r];
      int64_t j = 0;
      const __m256 iv = _mm256_set1_ps(inv);
      for (; j + 8 <= n_real; j += 8)
        _mm256_storeu_ps(buf.data() + j, _mm256_mul_ps(exp8(_mm256_loadu_ps(buf.data() + j)), iv));
      for (; j < n_real; ++j) buf[j] = std::exp(buf[j]) * inv;
      if (in_range[r]) buf[local_t[r]] -= sc;
      for (j = 0; j < n_real; ++j) g[j] = static_cast<T>(buf[j]);
      for (; j < width; ++j) g[j] = static_cast<T>(0.0f);
    }
  });
}

#pragma GCC pop_options

struct FusedVocabParallelCrossEntropy : public torch::autograd::Function<FusedVocabParallelCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits_in, const at::Tensor& targets,
                            Communicator* comm, int64_t vocab_start, int64_t vocab_size, int64_t ignore_index) {
    const at::Tensor logits = logits_in.contiguous();
    const int64_t rows = logits.size(0), width = logits.size(1);
    const int64_t n_real = std::max<int64_t>(0, std::min(width, vocab_size - vocab_start));
    at::Tensor valid = targets.ne(ignore_index);
    at::Tensor in_range =
        targets.ge(vocab_start).logical_and(targets.lt(vocab_start + width)).logical_and(valid).contiguous();
    at::Tensor local_t = (targets - vocab_start).masked_fill(in_range.logical_not(), 0).contiguous();
    auto f32 = logits.options().dtype(at::kFloat);
    at::Tensor max = at::empty({rows}, f32), both = at::empty({2, rows}, f32);
    on_float_or_bf16(logits, [&](auto t) {
      using T = decltype(t);
      row_max_kernel<T>(logits.data_ptr<T>(), rows, width, n_real, max.data_ptr<float>());
    });
    if (comm) comm->all_reduce_sync(max, ReduceOp::kMax);
    on_float_or_bf16(logits, [&](auto t) {
      using T = decltype(t);
      sum_exp_kernel<T>(logits.data_ptr<T>(), rows, width, n_real, max.data_ptr<float>(),
                        local_t.data_ptr<int64_t>(), in_range.data_ptr<bool>(), both[0].data_ptr<float>(),
                        both[1].data_ptr<float>());
    });
    if (comm) comm->all_reduce_sync(both, ReduceOp::kSum);
    at::Tensor loss = (both[1].log() - both[0]).masked_fill(valid.logical_not(), 0.0f);
    ctx->save_for_backward({logits, max, both[1], local_t, in_range, valid});
    ctx->saved_data["n_real"] = n_real;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &max = saved[1], &local_t = saved[3], &in_range = saved[4];
    const at::Tensor sum_exp = saved[2].contiguous();
    const at::Tensor scale = (grads[0].to(at::kFloat) * saved[5].to(at::kFloat)).contiguous();
    at::Tensor grad = at::empty(logits.sizes(), logits.options());
    on_float_or_bf16(logits, [&](auto t) {
      using T = decltype(t);
      ce_grad_kernel<T>(logits.data_ptr<T>(), logits.size(0), logits.size(1), ctx->saved_data["n_real"].toInt(),
                        max.data_ptr<float>(), sum_exp.data_ptr<float>(), local_t.data_ptr<int64_t>(),
                        in_range.data_ptr<bool>(), scale.data_ptr<float>(), grad.data_ptr<T>());
    });
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

#if ANDYLLM_CUDA_KERNELS
// ---- one rank on CUDA (core/base/cuda_kernels.cu) ------------------------------------------
// Forward reads the logits once and keeps each row's log-sum-exp; backward writes the gradient
// in the logits' dtype in one pass. No [N, V] fp32 tensor at all.
struct CudaCrossEntropy : public torch::autograd::Function<CudaCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits_in, const at::Tensor& targets_in,
                            int64_t ignore_index) {
    const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto f32 = logits.options().dtype(at::kFloat);
    at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
    cuda::cross_entropy_forward(cuda_dtype(logits), logits.data_ptr(), targets.data_ptr<int64_t>(), rows, vocab,
                                ignore_index, loss.data_ptr<float>(), lse.data_ptr<float>(), cuda_stream_for(logits));
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &targets = saved[1], &lse = saved[2];
    const at::Tensor dloss = grads[0].to(at::kFloat).contiguous();
    at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
    cuda::cross_entropy_backward(cuda_dtype(logits), logits.data_ptr(), targets.data_ptr<int64_t>(),
                                 lse.data_ptr<float>(), dloss.data_ptr<float>(), logits.size(0), logits.size(1),
                                 ctx->saved_data["ignore_index"].toInt(), dlogits.data_ptr(), cuda_stream_for(logits));
    return {dlogits, at::Tensor(), at::Tensor()};
  }
};
#endif  // ANDYLLM_CUDA_KERNELS

// ---- composite (reference, CUDA with several ranks) --------------------------------------------------------

struct VocabParallelCrossEntropy : public torch::autograd::Function<VocabParallelCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits_in,
                            const at::Tensor& targets, Communicator* comm, int64_t vocab_start,
                            int64_t vocab_size, int64_t ignore_index) {
    at::Tensor logits = logits_in.to(at::kFloat);
    const int64_t n_local = logits.size(1);
    const int64_t n_real = std::max<int64_t>(0, std::min(n_local, vocab_size - vocab_start));
    if (n_real < n_local) {
      logits = logits.clone();
      logits.narrow(1, n_real, n_local - n_real).fill_(-std::numeric_limits<float>::infinity());
    }
    // 1. per-token max over the whole vocabulary
    at::Tensor max = std::get<0>(logits.max(1)).contiguous();
    if (comm) comm->all_reduce_sync(max, ReduceOp::kMax);
    at::Tensor shifted = logits - max.unsqueeze(1);
    // 2. target logit (only the owning rank contributes) and sum of exp, in one all-reduce
    at::Tensor valid = targets.ne(ignore_index);
    at::Tensor in_range =
        targets.ge(vocab_start).logical_and(targets.lt(vocab_start + n_local)).logical_and(valid);
    at::Tensor local_t = (targets - vocab_start).masked_fill(in_range.logical_not(), 0);
    at::Tensor exp = shifted.exp();
    at::Tensor both = at::stack({shifted.gather(1, local_t.unsqueeze(1))
                                     .squeeze(1)
                                     .masked_fill(in_range.logical_not(), 0.0f),
                                 exp.sum(1)})
                          .contiguous();
    if (comm) comm->all_reduce_sync(both, ReduceOp::kSum);
    at::Tensor target_logit = both[0], sum_exp = both[1];
    at::Tensor loss = (sum_exp.log() - target_logit).masked_fill(valid.logical_not(), 0.0f);
    at::Tensor softmax = exp / sum_exp.unsqueeze(1);
    ctx->save_for_backward({softmax, local_t, in_range, valid});
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits_in.scalar_type());
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor grad = saved[0].clone();
    const at::Tensor& local_t = saved[1];
    grad.scatter_add_(1, local_t.unsqueeze(1), -saved[2].to(at::kFloat).unsqueeze(1));
    at::Tensor scale = grads[0].to(at::kFloat) * saved[3].to(at::kFloat);
    grad.mul_(scale.unsqueeze(1));
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad.to(dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                        const CommPtr& tp, int64_t vocab_start, int64_t vocab_size,
                                        int64_t ignore_index, bool fused) {
  ANDY_CHECK(logits.dim() == 2 && targets.dim() == 1 && logits.size(0) == targets.size(0),
             "vocab_parallel_cross_entropy: expected logits [N, V_local] and targets [N], got ",
             logits.sizes(), " and ", targets.sizes());
  ANDY_CHECK(targets.scalar_type() == at::kLong,
             "vocab_parallel_cross_entropy: targets must be int64");
  Communicator* comm = tp_active(tp) ? tp.get() : nullptr;
  if (fused && fused_kernels_enabled() && logits.is_cpu() &&
      (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16))
    return FusedVocabParallelCrossEntropy::apply(logits, targets, comm, vocab_start, vocab_size, ignore_index);
  // One rank holding the whole (unpadded) vocabulary on CUDA: our kernels (one pass forward, one
  // backward), else LibTorch's log_softmax + NLL in fp32; the composite below materializes the
  // fp32 logits, their shift, exp and softmax and clones the softmax for the gradient.
  if (fused && fused_ops_requested() && comm == nullptr && logits.is_cuda() && vocab_start == 0 &&
      logits.size(1) == vocab_size) {
#if ANDYLLM_CUDA_KERNELS
    if (cuda_kernels_apply(logits) && targets.device() == logits.device())
      return CudaCrossEntropy::apply(logits, targets, ignore_index);
#endif
    return at::cross_entropy_loss(logits.to(at::kFloat), targets, {}, at::Reduction::None, ignore_index);
  }
  return VocabParallelCrossEntropy::apply(logits, targets, comm, vocab_start, vocab_size,
                                          ignore_index);
}

at::Tensor vocab_parallel_cross_entropy_mean(const at::Tensor& logits, const at::Tensor& targets,
                                             const CommPtr& tp, int64_t vocab_start,
                                             int64_t vocab_size, int64_t ignore_index) {
  at::Tensor flat_logits = logits.reshape({-1, logits.size(-1)});
  at::Tensor flat_targets = targets.reshape({-1});
  at::Tensor per_token = vocab_parallel_cross_entropy(flat_logits, flat_targets, tp, vocab_start,
                                                      vocab_size, ignore_index);
  at::Tensor count = flat_targets.ne(ignore_index).sum().clamp_min(1).to(at::kFloat);
  return per_token.sum() / count;
}

}  // namespace andy
