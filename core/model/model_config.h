// Shapes derived from [model] (andy::ModelConfig) and the checks the model needs before it
// allocates anything. Convention: "local" means one tensor-parallel rank's share.
//   ffn_dim (when 0) = LLaMA's int(2 * 4 * dim / 3) rounded up to ffn_multiple_of.
//   padded vocabulary = vocab_size rounded up to a multiple of lcm(64, tp): the vocabulary
//   shards evenly over TP ranks; padded rows are zero and their logits count as -inf in the loss.
#pragma once

#include <cstdint>

#include "core/config/config.h"

namespace andy {

// The multiple the vocabulary is padded to before the tp factor (lcm(kVocabPadMultiple, tp)).
constexpr int64_t kVocabPadMultiple = 64;

// derived_ffn_dim and head_dim are in core/config/config.h (the shape rules live there).
int64_t padded_vocab_size(const ModelConfig& m, int tp_size);

// Throws ConfigError with a message naming the keys when the model cannot be built or split
// over `tp_size` ranks: the first of model_shape_problems (core/config/config.h), the rules
// validate_config applies to a run's config. The model's own guard, also used by tools that
// build a model without a run config.
void validate_model_shapes(const ModelConfig& m, int tp_size);

}  // namespace andy
