// Vocab-parallel cross-entropy (Megatron-LM): each TP rank holds logits for a contiguous slice
// of the (padded) vocabulary; the full logits are never gathered. Forward all-reduces per-token
// tensors only: the max (MAX), then the target logit and the sum of exp together (SUM).
// Backward needs no communication: d loss / d logits = softmax - onehot(target), on the local
// slice. Computed in fp32 whatever the logits' dtype; the gradient is returned in their dtype.
// Columns whose global id is >= vocab_size (the padding that makes the vocabulary divide by
// tp) are treated as logits of -inf: probability 0, gradient 0.
//
//   at::Tensor per_token = vocab_parallel_cross_entropy(logits2d, targets, tp, start, vocab, -100);
#pragma once

#include <ATen/ATen.h>

#include "parallel/communicator.h"

namespace andy {

// logits: [N, local_vocab] (this rank's columns, global ids vocab_start + j).
// targets: [N] int64 global ids; `ignore_index` targets give loss 0 and gradient 0.
// Returns the per-token loss [N] (fp32), identical on every TP rank. A null/size-1 `tp` is
// the dense cross-entropy (with padding columns still masked). On CPU (fp32 or bf16 logits,
// AVX2 + FMA, ANDYLLM_FUSED_OPS not 0) a fused kernel computes it without materializing the
// softmax; `fused` = false forces the composite (the tests' reference).
at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                        const CommPtr& tp, int64_t vocab_start, int64_t vocab_size,
                                        int64_t ignore_index = -100, bool fused = true);

// Mean over the non-ignored targets of any shape ([B, T, local_vocab] logits, [B, T] targets).
// Returns 0 (with a zero gradient) when every target is ignored.
at::Tensor vocab_parallel_cross_entropy_mean(const at::Tensor& logits, const at::Tensor& targets,
                                             const CommPtr& tp, int64_t vocab_start,
                                             int64_t vocab_size, int64_t ignore_index = -100);

}  // namespace andy
