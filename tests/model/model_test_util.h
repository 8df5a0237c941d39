// Helpers shared by the model tests: tiny configs, deterministic inputs, relative error.
// Relative error of a against a reference b is max|a - b| / max|b| (norm-wise, so entries
// near zero do not blow it up); every comparison prints it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <string>

#include "core/config/config.h"

namespace andy::test {

// dim 64, 2 layers, 8 query heads over 4 kv heads (head size 8), vocab 100 (padded to 128),
// ffn derived (192): every shape divides by tp 1, 2 and 4.
inline ModelConfig tiny_config(bool tie, int64_t n_kv_head = 4) {
  ModelConfig m;
  m.dim = 64;
  m.n_layer = 2;
  m.n_head = 8;
  m.n_kv_head = n_kv_head;
  m.ffn_dim = 0;
  m.ffn_multiple_of = 32;
  m.vocab_size = 100;
  m.max_seq_len = 32;
  m.norm_eps = 1e-5;
  m.rope_theta = 10000.0;
  m.tie_embeddings = tie;
  m.init_std = 0.1;  // larger than usual so attention patterns and logits are not flat
  return m;
}

inline at::Tensor random_tokens(int64_t b, int64_t t, int64_t vocab, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(vocab, {b, t}, gen, at::TensorOptions().dtype(at::kLong));
}

inline double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

inline double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  double denom = std::max(max_abs(ref.to(at::kDouble)), 1e-30);
  return max_abs(a.to(at::kDouble) - ref.to(at::kDouble)) / denom;
}

// Prints "what: max |diff| = x, rel = y" (rank-prefixed by the caller's `tag`) and returns rel.
inline double report(const std::string& tag, const at::Tensor& a, const at::Tensor& ref) {
  double diff = max_abs(a.to(at::kDouble) - ref.to(at::kDouble));
  double rel = rel_err(a, ref);
  std::printf("  %-60s max|diff| = %.3e  rel = %.3e\n", tag.c_str(), diff, rel);
  return rel;
}

}  // namespace andy::test
