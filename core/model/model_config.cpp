// Derived model shapes and shape checks (see model_config.h).
#include "core/model/model_config.h"

#include <numeric>
#include <string>

#include "core/base/error.h"

namespace andy {

int64_t derived_ffn_dim(const ModelConfig& m) {
  if (m.ffn_dim > 0) return m.ffn_dim;
  int64_t hidden = (2 * 4 * m.dim) / 3;  // int(2 * (4 * dim) / 3) as in Meta's LLaMA
  int64_t mult = m.ffn_multiple_of;
  return mult * ((hidden + mult - 1) / mult);
}

int64_t head_dim(const ModelConfig& m) { return m.dim / m.n_head; }

int64_t padded_vocab_size(const ModelConfig& m, int tp_size) {
  int64_t mult = std::lcm<int64_t>(kVocabPadMultiple, tp_size);
  return mult * ((m.vocab_size + mult - 1) / mult);
}

void validate_model_shapes(const ModelConfig& m, int tp) {
  auto fail = [](const std::string& msg) { throw ConfigError("model shape: " + msg); };
  const std::string tps = "parallel.tensor_parallel_size = " + std::to_string(tp);
  if (tp < 1) fail(tps + " must be at least 1");
  if (m.n_head < 1 || m.n_kv_head < 1 || m.dim < 1 || m.n_layer < 1 || m.vocab_size < 1)
    fail("model.dim, n_layer, n_head, n_kv_head and vocab_size must be positive");
  if (m.dim % m.n_head != 0)
    fail("model.dim = " + std::to_string(m.dim) + " is not divisible by model.n_head = " +
         std::to_string(m.n_head) + ": the head size must be a whole number");
  if (head_dim(m) % 2 != 0)
    fail("head size model.dim / model.n_head = " + std::to_string(head_dim(m)) +
         " is odd: rotary embeddings need an even head size");
  if (m.n_kv_head > m.n_head || m.n_head % m.n_kv_head != 0)
    fail("model.n_head = " + std::to_string(m.n_head) +
         " is not a multiple of model.n_kv_head = " + std::to_string(m.n_kv_head) +
         ": each key/value head must serve a whole group of query heads");
  if (m.n_head % tp != 0)
    fail("model.n_head = " + std::to_string(m.n_head) + " is not divisible by " + tps +
         ": each tensor-parallel rank must hold whole heads");
  if (m.n_kv_head % tp != 0)
    fail("model.n_kv_head = " + std::to_string(m.n_kv_head) + " is not divisible by " + tps +
         ": each tensor-parallel rank must hold whole key/value heads");
  if (derived_ffn_dim(m) % tp != 0)
    fail("ffn_dim = " + std::to_string(derived_ffn_dim(m)) + (m.ffn_dim > 0 ? "" : " (derived)") +
         " is not divisible by " + tps + ": MLP columns are split evenly");
  if (padded_vocab_size(m, tp) % tp != 0)  // cannot happen (lcm), kept as the invariant
    fail("padded vocabulary is not divisible by " + tps);
}

}  // namespace andy
