// Element types by the names the command line, the config files and the checkpoint formats use
// ("fp32" / "float32" / "float", "bf16" / "bfloat16", "fp16" / "float16" / "half", ...), in one place.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

namespace andy {

// The element type `name` stands for, or nullopt for a name it does not know.
inline std::optional<at::ScalarType> scalar_type_named(const std::string& name) {
  if (name == "fp32" || name == "float32" || name == "float" || name == "f32") return at::kFloat;
  if (name == "fp64" || name == "float64" || name == "double") return at::kDouble;
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "half" || name == "f16") return at::kHalf;
  if (name == "int32") return at::kInt;
  if (name == "int64") return at::kLong;
  return std::nullopt;
}

}  // namespace andy
