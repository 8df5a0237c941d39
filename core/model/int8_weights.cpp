// Per-channel int8 weights (see int8_weights.h).
#include "core/model/int8_weights.h"

#include <nlohmann/json.hpp>

#include "core/base/error.h"
#include "core/base/strings.h"

namespace andy {

bool is_int8_linear(const std::string& name) {
  return ends_with(name, "_proj.weight") || name == "lm_head.weight";
}

Int8Tensor quantize_per_channel(const at::Tensor& w) {
  ANDY_CHECK(w.dim() == 2, "quantize_per_channel: a 2-D weight expected, got ", w.sizes());
  at::Tensor f = w.detach().to(at::kCPU, at::kFloat);
  at::Tensor scale = f.abs().amax(1) / 127.0;
  scale = scale.masked_fill(scale == 0, 1.0);
  at::Tensor q = at::round(f / scale.unsqueeze(1)).clamp(-127, 127).to(at::kChar);
  return {q, scale};
}

at::Tensor dequantize_per_channel(const at::Tensor& q, const at::Tensor& scale) {
  return q.to(at::kFloat) * scale.to(at::kFloat).unsqueeze(1);
}

StateDict quantize_state_dict(const StateDict& full) {
  StateDict out;
  for (const auto& [name, t] : full) {
    if (!is_int8_linear(name)) {
      out[name] = t;
      continue;
    }
    Int8Tensor q = quantize_per_channel(t);
    out[name] = q.q;
    out[name + kInt8ScaleSuffix] = q.scale;
  }
  return out;
}

StateDict dequantize_state_dict(const StateDict& quantized) {
  StateDict out;
  for (const auto& [name, t] : quantized) {
    if (ends_with(name, kInt8ScaleSuffix)) continue;
    if (t.scalar_type() == at::kChar) {
      auto it = quantized.find(name + kInt8ScaleSuffix);
      ANDY_CHECK_T(IoError, it != quantized.end(), "int8 weight '", name, "' has no ", name,
                   kInt8ScaleSuffix);
      out[name] = dequantize_per_channel(t, it->second);
    } else {
      out[name] = t;
    }
  }
  return out;
}

PartitionSpecs with_int8_scales(const PartitionSpecs& specs) {
  PartitionSpecs out = specs;
  for (const auto& [name, spec] : specs) {
    if (!is_int8_linear(name)) continue;
    out[name + kInt8ScaleSuffix] =
        spec.dim == 0 ? PartitionSpec::split(0, spec.full_size, spec.padded_size) : PartitionSpec::replicate();
  }
  return out;
}

std::string quantization_json() {
  nlohmann::json j = {{"method", "dynamic_int8"},
                      {"weights", "per_channel_symmetric"},
                      {"activations", "dynamic_per_tensor"},
                      {"quantized", "linear layers (*_proj, lm_head)"},
                      {"format_version", 1}};
  return j.dump(2) + "\n";
}

}  // namespace andy
