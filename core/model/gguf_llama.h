// Our LLaMA as llama.cpp's "llama" architecture in a GGUF file (core/model/gguf.h): the
// llama.* hyperparameters and every tensor under llama.cpp's name. Q and K rows are permuted
// from our rotate_half layout (Hugging Face's) to llama.cpp's interleaved RoPE pairs, as
// llama.cpp's convert_hf_to_gguf.py does; norms are always F32, `output.weight` is omitted when
// the head is tied. The tokenizer keys (tokenizer.ggml.*) are added by the caller.
//
//   GgufWriter w;
//   add_llama_gguf(w, full, cfg.model, GgmlType::kQ8_0, "tiny");
#pragma once

#include <string>

#include "core/config/config.h"
#include "core/model/gguf.h"
#include "parallel/tp_partition.h"

namespace andy {

// "model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight" (Error for other names).
std::string gguf_tensor_name(const std::string& hf_name);

// Rows of a q_proj / k_proj weight [n_heads * head_dim, dim] reordered per head from
// [first halves..., second halves...] to interleaved pairs (x0, x_{d/2}, x1, ...).
at::Tensor permute_rotary_rows(const at::Tensor& w, int64_t n_heads);

// general.file_type of a file whose 2-D weights are `weight_type` (0 F32, 1 F16, 7 Q8_0, 32 BF16).
uint32_t gguf_file_type(GgmlType weight_type);

// Adds general.* and llama.* keys and the tensors of `full` (fp32 or any float dtype, full
// unpadded shapes). ConfigError when a 2-D weight cannot be `weight_type` (Q8_0 needs rows of a
// multiple of 32 values), naming the tensor and the key that sets its width.
void add_llama_gguf(GgufWriter& w, const StateDict& full, const ModelConfig& m, GgmlType weight_type,
                    const std::string& model_name);

}  // namespace andy
