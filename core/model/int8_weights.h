// Int8 weights of a model quantized by `andyllm quantize` (dynamic quantization for CPU
// serving): every linear layer's weight (q/k/v/o, gate/up/down, an untied lm_head) stored as
// int8 with one fp32 scale per output row, symmetric: w ~= q * scale[row], q in [-127, 127],
// scale = max|w[row]| / 127 (1 for an all-zero row). Embeddings and norms stay fp32.
//
// On disk: a best_model-like directory: model.pt (LibTorch archive; "NAME" int8 and
// "NAME_scale" fp32 [rows] for each quantized weight, the other tensors fp32), config.toml,
// tokenizer.model, and quantization.json ({"method": "dynamic_int8", "weights": "per_channel_symmetric",
// "format_version": 1}), whose presence marks the directory as int8 (core/model/weights_io.h).
// Under tensor parallelism a scale is split with its rows: with the weight along dim 0
// (column-parallel), replicated when the weight is split along its columns (row-parallel).
//
//   StateDict q = quantize_state_dict(full);              // for write_full_weights
//   PartitionSpecs specs = with_int8_scales(llama_partition_specs(m, tp));
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "parallel/tp_partition.h"

namespace andy {

constexpr const char* kInt8ScaleSuffix = "_scale";
constexpr const char* kQuantizationFile = "quantization.json";

// True for the weights that are quantized (linear layers: *_proj.weight and lm_head.weight).
bool is_int8_linear(const std::string& name);

struct Int8Tensor {
  at::Tensor q;      // int8, the weight's shape
  at::Tensor scale;  // fp32 [rows]
};
Int8Tensor quantize_per_channel(const at::Tensor& w);
at::Tensor dequantize_per_channel(const at::Tensor& q, const at::Tensor& scale);  // fp32

// Full state dict -> the same with each linear weight int8 plus its NAME_scale; and back
// (dequantized fp32, for export).
StateDict quantize_state_dict(const StateDict& full);
StateDict dequantize_state_dict(const StateDict& quantized);

// `specs` plus a spec for each quantized weight's scale.
PartitionSpecs with_int8_scales(const PartitionSpecs& specs);

// The text of quantization.json.
std::string quantization_json();

}  // namespace andy
