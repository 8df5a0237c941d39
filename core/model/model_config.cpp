// Derived model shapes and shape checks (see model_config.h).
#include "core/model/model_config.h"

#include <numeric>
#include <string>

#include "core/base/error.h"

namespace andy {

int64_t padded_vocab_size(const ModelConfig& m, int tp_size) {
  int64_t mult = std::lcm<int64_t>(kVocabPadMultiple, tp_size);
  return mult * ((m.vocab_size + mult - 1) / mult);
}

void validate_model_shapes(const ModelConfig& m, int tp) {
  Config c;
  c.model = m;
  c.parallel.tensor_parallel_size = tp;
  const std::vector<ShapeProblem> problems =
      model_shape_problems(c, [&](const std::string& key) { return key_with_value(c, key); });
  if (!problems.empty()) throw ConfigError("model shape: " + problems.front().message);
}

}  // namespace andy
