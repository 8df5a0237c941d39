// GGUF writer and Q8_0 quantizer (see gguf.h).
#include "core/model/gguf.h"

#include <cmath>
#include <cstring>

#include "core/base/durable_fs.h"
#include "core/base/error.h"

namespace andy {

namespace {

// gguf_type (ggml/include/gguf.h).
enum : uint32_t {
  kTypeU32 = 4, kTypeI32 = 5, kTypeF32 = 6, kTypeBool = 7, kTypeString = 8, kTypeArray = 9, kTypeU64 = 10
};

template <typename T>
void put(std::string& out, T v) {
  static_assert(std::is_trivially_copyable<T>::value, "plain values only");
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // the host is little-endian (x86-64, aarch64)
  out.append(b, sizeof(T));
}

void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

constexpr int64_t kQ8_0BlockBytes = 2 + kQ8_0Block;

}  // namespace

std::vector<uint8_t> quantize_q8_0(const float* x, int64_t n) {
  ANDY_CHECK(n % kQ8_0Block == 0, "quantize_q8_0: ", n, " values is not a multiple of ", kQ8_0Block);
  std::vector<uint8_t> out(static_cast<size_t>(n / kQ8_0Block * kQ8_0BlockBytes));
  for (int64_t b = 0; b < n / kQ8_0Block; ++b) {
    const float* xb = x + b * kQ8_0Block;
    float amax = 0.0f;
    for (int64_t j = 0; j < kQ8_0Block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t* yb = out.data() + b * kQ8_0BlockBytes;
    const at::Half h(d);  // round to nearest even, as GGML_FP32_TO_FP16
    std::memcpy(yb, &h.x, 2);
    for (int64_t j = 0; j < kQ8_0Block; ++j)
      yb[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(xb[j] * id)));
  }
  return out;
}

std::vector<float> dequantize_q8_0(const uint8_t* blocks, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t b = 0; b < n / kQ8_0Block; ++b) {
    const uint8_t* yb = blocks + b * kQ8_0BlockBytes;
    at::Half h;
    std::memcpy(&h.x, yb, 2);
    const float d = static_cast<float>(h);
    for (int64_t j = 0; j < kQ8_0Block; ++j)
      out[b * kQ8_0Block + j] = d * static_cast<float>(static_cast<int8_t>(yb[2 + j]));
  }
  return out;
}

void GgufWriter::add_u32(const std::string& key, uint32_t v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeU32);
  put(kv_, v);
  ++n_kv_;
}
void GgufWriter::add_i32(const std::string& key, int32_t v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeI32);
  put(kv_, v);
  ++n_kv_;
}
void GgufWriter::add_f32(const std::string& key, float v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeF32);
  put(kv_, v);
  ++n_kv_;
}
void GgufWriter::add_bool(const std::string& key, bool v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeBool);
  put<uint8_t>(kv_, v ? 1 : 0);
  ++n_kv_;
}
void GgufWriter::add_string(const std::string& key, const std::string& v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeString);
  put_string(kv_, v);
  ++n_kv_;
}
void GgufWriter::add_string_array(const std::string& key, const std::vector<std::string>& v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeArray);
  put<uint32_t>(kv_, kTypeString);
  put<uint64_t>(kv_, v.size());
  for (const auto& s : v) put_string(kv_, s);
  ++n_kv_;
}
void GgufWriter::add_f32_array(const std::string& key, const std::vector<float>& v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeArray);
  put<uint32_t>(kv_, kTypeF32);
  put<uint64_t>(kv_, v.size());
  for (float f : v) put(kv_, f);
  ++n_kv_;
}
void GgufWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  put_string(kv_, key);
  put<uint32_t>(kv_, kTypeArray);
  put<uint32_t>(kv_, kTypeI32);
  put<uint64_t>(kv_, v.size());
  for (int32_t i : v) put(kv_, i);
  ++n_kv_;
}

void GgufWriter::add_tensor(const std::string& name, const at::Tensor& t, GgmlType type) {
  TensorData d;
  d.name = name;
  d.type = type;
  for (int64_t i = t.dim() - 1; i >= 0; --i) d.ne.push_back(t.size(i));
  at::Tensor c = t.detach().cpu();
  auto take = [&](const at::Tensor& x) {
    const auto* p = static_cast<const uint8_t*>(x.data_ptr());
    d.bytes.assign(p, p + x.numel() * x.element_size());
  };
  switch (type) {
    case GgmlType::kF32: take(c.to(at::kFloat).contiguous()); break;
    case GgmlType::kF16: take(c.to(at::kHalf).contiguous()); break;
    case GgmlType::kBF16: take(c.to(at::kBFloat16).contiguous()); break;
    case GgmlType::kQ8_0: {
      ANDY_CHECK(t.dim() >= 1 && t.size(t.dim() - 1) % kQ8_0Block == 0, "GGUF tensor '", name,
                 "': q8_0 needs rows of a multiple of ", kQ8_0Block, " values, its shape is ", t.sizes());
      at::Tensor f = c.to(at::kFloat).contiguous();
      d.bytes = quantize_q8_0(f.data_ptr<float>(), f.numel());
      break;
    }
  }
  tensors_.push_back(std::move(d));
}

void GgufWriter::write(const std::string& file) const {
  std::string head;
  head += "GGUF";
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, n_kv_);
  head += kv_;
  uint64_t offset = 0;
  auto aligned = [](uint64_t x) { return (x + kGgufAlignment - 1) / kGgufAlignment * kGgufAlignment; };
  for (const auto& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.ne.size()));
    for (int64_t n : t.ne) put<uint64_t>(head, static_cast<uint64_t>(n));
    put<uint32_t>(head, static_cast<uint32_t>(t.type));
    put<uint64_t>(head, offset);
    offset = aligned(offset + t.bytes.size());
  }
  DurableWriter out(file);
  out.write(head);
  out.pad_to(kGgufAlignment);
  for (const auto& t : tensors_) {  // each tensor starts aligned, as the offsets above say
    out.write(t.bytes.data(), t.bytes.size());
    out.pad_to(kGgufAlignment);
  }
  out.finish();
}

}  // namespace andy
