// Our LLaMA in llama.cpp's GGUF layout (see gguf_llama.h).
#include "core/model/gguf_llama.h"

#include <regex>

#include "core/base/error.h"
#include "core/base/strings.h"
#include "core/model/model_config.h"
#include "core/model/weights_io.h"

namespace andy {

std::string gguf_tensor_name(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> fixed = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"}};
  for (const auto& [from, to] : fixed)
    if (hf == from) return to;
  static const std::vector<std::pair<std::string, std::string>> layer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"}};
  static const std::regex re(R"(model\.layers\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(hf, m, re))
    for (const auto& [from, to] : layer)
      if (m[2] == from) return "blk." + m[1].str() + "." + to;
  ANDY_THROW(Error, "GGUF: no llama.cpp name for tensor '", hf, "'");
}

at::Tensor permute_rotary_rows(const at::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0);
  ANDY_CHECK(rows % (2 * n_heads) == 0, "permute_rotary_rows: ", rows, " rows for ", n_heads, " heads");
  // [heads, 2 (halves), d/2, in] -> [heads, d/2, 2, in]: row j of the first half and row j of
  // the second half become adjacent.
  return w.reshape({n_heads, 2, rows / n_heads / 2, -1}).transpose(1, 2).reshape(w.sizes()).contiguous();
}

uint32_t gguf_file_type(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 0;
    case GgmlType::kF16: return 1;
    case GgmlType::kQ8_0: return 7;
    case GgmlType::kBF16: return 32;
  }
  return 0;
}

void add_llama_gguf(GgufWriter& w, const StateDict& full, const ModelConfig& m, GgmlType weight_type,
                    const std::string& model_name) {
  w.add_string("general.architecture", "llama");
  w.add_string("general.type", "model");
  w.add_string("general.name", model_name);
  w.add_u32("general.file_type", gguf_file_type(weight_type));
  w.add_u32("general.quantization_version", 2);
  w.add_u32("general.alignment", kGgufAlignment);
  w.add_u32("llama.vocab_size", static_cast<uint32_t>(m.vocab_size));
  w.add_u32("llama.context_length", static_cast<uint32_t>(m.max_seq_len));
  w.add_u32("llama.embedding_length", static_cast<uint32_t>(m.dim));
  w.add_u32("llama.block_count", static_cast<uint32_t>(m.n_layer));
  w.add_u32("llama.feed_forward_length", static_cast<uint32_t>(derived_ffn_dim(m)));
  w.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(head_dim(m)));
  w.add_u32("llama.attention.head_count", static_cast<uint32_t>(m.n_head));
  w.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(m.n_kv_head));
  w.add_u32("llama.attention.key_length", static_cast<uint32_t>(head_dim(m)));
  w.add_u32("llama.attention.value_length", static_cast<uint32_t>(head_dim(m)));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(m.norm_eps));
  w.add_f32("llama.rope.freq_base", static_cast<float>(m.rope_theta));
  for (const auto& [name, shape] : model_tensor_shapes(m)) {
    auto it = full.find(name);
    ANDY_CHECK(it != full.end(), "GGUF export: the state dict lacks '", name, "'");
    at::Tensor t = it->second.detach().to(at::kCPU, at::kFloat);
    if (ends_with(name, "q_proj.weight")) t = permute_rotary_rows(t, m.n_head);
    if (ends_with(name, "k_proj.weight")) t = permute_rotary_rows(t, m.n_kv_head);
    const bool matrix = t.dim() == 2;
    if (matrix && weight_type == GgmlType::kQ8_0)
      ANDY_CHECK_T(ConfigError, t.size(1) % kQ8_0Block == 0, "GGUF q8_0: tensor '", name, "' has rows of ",
                   t.size(1), " values, not a multiple of ", kQ8_0Block,
                   " (model.dim and the FFN width must be multiples of 32 for q8_0; use --dtype f16 or f32)");
    w.add_tensor(gguf_tensor_name(name), t, matrix ? weight_type : GgmlType::kF32);
  }
}

}  // namespace andy
