// Vocab-parallel cross-entropy as one autograd function (see tp_cross_entropy.h).
#include "parallel/tp_cross_entropy.h"

#include <torch/torch.h>

#include <limits>

#include "core/base/error.h"
#include "parallel/tp_ops.h"

namespace andy {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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
                                        int64_t ignore_index) {
  ANDY_CHECK(logits.dim() == 2 && targets.dim() == 1 && logits.size(0) == targets.size(0),
             "vocab_parallel_cross_entropy: expected logits [N, V_local] and targets [N], got ",
             logits.sizes(), " and ", targets.sizes());
  ANDY_CHECK(targets.scalar_type() == at::kLong,
             "vocab_parallel_cross_entropy: targets must be int64");
  Communicator* comm = tp_active(tp) ? tp.get() : nullptr;
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
