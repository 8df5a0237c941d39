// The GGUF file format (version 3), as llama.cpp reads it (ggml/src/gguf.cpp), written by our
// own code: "GGUF", version, tensor count, key/value count; the key/values (typed, strings
// as u64 length + bytes, arrays as element type + u64 count + elements); each tensor's name,
// dims, ggml type and data offset; then, after padding to the alignment (32), the tensor data,
// each tensor starting at a multiple of the alignment. All little-endian.
//
// Convention: a tensor's GGUF dims are its PyTorch shape reversed (ne[0] is the contiguous
// dimension); the bytes are the same row-major data. Q8_0 stores blocks of 32 values along
// ne[0] as {fp16 scale d = max|x| / 127, int8 q[32] = round(x / d)}, exactly as ggml's
// reference quantizer quantize_row_q8_0_ref.
//
//   GgufWriter w;
//   w.add_string("general.architecture", "llama");
//   w.add_tensor("token_embd.weight", embed, GgmlType::kQ8_0);
//   w.write("model.gguf");
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace andy {

// ggml_type values (ggml.h) of the types we write.
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ8_0 = 8, kBF16 = 30 };
constexpr int64_t kQ8_0Block = 32;
constexpr uint32_t kGgufAlignment = 32;

// One Q8_0 block per 32 values of x (n a multiple of 32): 34 bytes each.
std::vector<uint8_t> quantize_q8_0(const float* x, int64_t n);
// The inverse, for tests and for reading our own files back.
std::vector<float> dequantize_q8_0(const uint8_t* blocks, int64_t n);

// Collects key/values and tensors, then writes the file in one pass. Not thread-safe.
class GgufWriter {
 public:
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, const std::string& v);
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);

  // Converts `t` (any float dtype, CPU) to `type` now. Q8_0 needs the last dim to be a
  // multiple of 32 (Error naming the tensor otherwise).
  void add_tensor(const std::string& name, const at::Tensor& t, GgmlType type);

  // Writes everything to `file`, fsynced; IoError naming it (and the free space) on failure,
  // the partial file removed.
  void write(const std::string& file) const;

 private:
  struct TensorData {
    std::string name;
    std::vector<int64_t> ne;  // reversed shape
    GgmlType type;
    std::vector<uint8_t> bytes;
  };
  std::string kv_;  // the encoded key/value pairs
  uint64_t n_kv_ = 0;
  std::vector<TensorData> tensors_;
};

}  // namespace andy
