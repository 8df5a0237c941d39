// The Hugging Face model directory (what transformers' LlamaForCausalLM and vLLM load):
// config.json + generation_config.json + model.safetensors (or shards + index). Tensor names
// are ours already (Hugging Face's, rotate_half RoPE layout: no Q/K permutation either way).
// The tokenizer files beside them are written by data/hf_tokenizer.h.
//
// Our special ids (pad 0, unk 1, bos 2, eos 3) are written explicitly: transformers' LlamaConfig
// defaults (bos 1, eos 2, no pad) are wrong for our vocabulary.
//
//   write_hf_model(full, cfg.model, at::kBFloat16, "out/tiny_hf", 5'000'000'000);
//   ModelConfig m = model_config_from_hf_json(text, "hf/config.json");   // on import
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "core/config/config.h"
#include "parallel/tp_partition.h"

namespace andy {

// Special token ids written into config.json / generation_config.json.
struct SpecialIds {
  int pad = 0, unk = 1, bos = 2, eos = 3;
};

// "float32" / "bfloat16" / "float16" <-> dtype (ConfigError naming `what` and the choices).
at::ScalarType hf_dtype(const std::string& name, const std::string& what);
std::string hf_dtype_name(at::ScalarType t);

// config.json text for LlamaForCausalLM with every field written explicitly.
std::string hf_config_json(const ModelConfig& m, at::ScalarType dtype, const SpecialIds& ids);
// Our model config from a config.json. ConfigError naming `file` and the field when the model
// is not one ours can run: another model_type, hidden_act other than silu, rope_scaling set,
// attention or MLP biases, head_dim other than hidden_size / num_attention_heads.
ModelConfig model_config_from_hf_json(const std::string& text, const std::string& file);

// Writes config.json, generation_config.json and the weights (full tensors, Hugging Face shaped,
// converted to `dtype`; lm_head.weight omitted when tied; safetensors shards above
// `max_shard_bytes`) into `dir`, which exists. IoError on a failed write.
void write_hf_model(const StateDict& full, const ModelConfig& m, at::ScalarType dtype,
                    const std::string& dir, uint64_t max_shard_bytes, const SpecialIds& ids = {});

}  // namespace andy
