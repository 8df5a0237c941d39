// Tensor-parallel linear and embedding layers (see tp_layers.h). Weights are registered as
// "weight" so module paths give Hugging Face names.
#include "parallel/tp_layers.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cstring>
#include <vector>

#include "core/base/error.h"
#include "parallel/cpu_gemm.h"
#include "parallel/tp_ops.h"

namespace andy {

at::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  t.normal_(0.0, std, gen);
  return t;
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  const bool one_row = x.device().is_cpu() && weight.device().is_cpu() && x.dim() >= 1 && x.numel() == x.size(-1);
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad());
  const bool fp32 = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat;
  // Packed weights in panels (serving): one row like several, bit for bit (cpu_fp32_panels_on).
  if (one_row && fp32 && !grad && cpu_fp32_panels_on()) return cpu_linear(x, weight);
  if (one_row && fp32) {
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return at::mv(weight, x.reshape({-1})).view(shape);
  }
  // bf16 (serve.dtype = bf16): our kernel, which sums in fp32 and reads the weights at memory
  // speed (LibTorch 1.13's bf16 mv rounds partial sums to bf16; at tp 4 a quarter of the engine
  // test's greedy tokens then left the fp32 reference far from ties).
  if (one_row && !grad && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16)
    return cpu_bf16_gemv(x, weight);
  return cpu_linear(x, weight);  // oneDNN's sgemm for CPU fp32, at::linear otherwise
}

uint64_t param_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  // splitmix64 of the mix, so nearby seeds give unrelated streams
  uint64_t z = h ^ (seed + 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return (z ^ (z >> 31)) & 0x7fffffffffffffffull;
}

namespace {

at::Tensor register_sharded(torch::nn::Module& m, const at::Tensor& full, const PartitionSpec& spec,
                            const CommPtr& tp) {
  return m.register_parameter("weight", shard_tensor(full, spec, tp_rank_of(tp), tp_size_of(tp)));
}

void load_into(at::Tensor& weight, const at::Tensor& full, const PartitionSpec& spec,
               const CommPtr& tp) {
  at::Tensor shard = shard_tensor(full, spec, tp_rank_of(tp), tp_size_of(tp));
  ANDY_CHECK(shard.sizes() == weight.sizes(), "load_full_weight: shard shape ", shard.sizes(),
             " does not match the parameter ", weight.sizes());
  at::NoGradGuard g;
  weight.copy_(shard);
}

std::shared_ptr<Int8Linear> int8_of(at::Tensor& weight, const at::Tensor& q, const at::Tensor& scale) {
  ANDY_CHECK(q.sizes() == weight.sizes(), "load_int8_weight: int8 shard ", q.sizes(),
             " does not match the parameter ", weight.sizes());
  auto lin = std::make_shared<Int8Linear>(q, scale);
  at::NoGradGuard g;
  weight.set_data(at::empty({0}, weight.options()));  // the fp32 copy is not kept
  return lin;
}

}  // namespace

// ---- ColumnParallelLinear ------------------------------------------------------------------

ColumnParallelLinearImpl::ColumnParallelLinearImpl(ColumnParallelLinearOptions o)
    : options(std::move(o)) {
  int tp = tp_size_of(options.tp());
  int64_t padded =
      options.padded_out_features() > 0 ? options.padded_out_features() : options.out_features();
  ANDY_CHECK_T(ConfigError, padded % tp == 0, "ColumnParallelLinear: output size ", padded,
               " is not divisible by tensor_parallel_size ", tp);
  weight = register_sharded(*this,
                            seeded_normal({options.out_features(), options.in_features()},
                                          options.init_std(), options.seed()),
                            partition_spec(), options.tp());
}

PartitionSpec ColumnParallelLinearImpl::partition_spec() const {
  return PartitionSpec::split(0, options.out_features(), options.padded_out_features());
}

at::Tensor ColumnParallelLinearImpl::forward(const at::Tensor& x) {
  at::Tensor in = options.copy_input() ? copy_to_tp_region(x, options.tp()) : x;
  return int8_ ? int8_->forward(in) : linear_rows(in, weight);
}

void ColumnParallelLinearImpl::load_int8_weight(const at::Tensor& q, const at::Tensor& scale) {
  int8_ = int8_of(weight, q, scale);
}

void ColumnParallelLinearImpl::load_full_weight(const at::Tensor& full) {
  load_into(weight, full, partition_spec(), options.tp());
}

// ---- RowParallelLinear ---------------------------------------------------------------------

RowParallelLinearImpl::RowParallelLinearImpl(RowParallelLinearOptions o) : options(std::move(o)) {
  int tp = tp_size_of(options.tp());
  ANDY_CHECK_T(ConfigError, options.in_features() % tp == 0, "RowParallelLinear: input size ",
               options.in_features(), " is not divisible by tensor_parallel_size ", tp);
  weight = register_sharded(*this,
                            seeded_normal({options.out_features(), options.in_features()},
                                          options.init_std(), options.seed()),
                            partition_spec(), options.tp());
}

PartitionSpec RowParallelLinearImpl::partition_spec() const {
  return PartitionSpec::split(1, options.in_features());
}

at::Tensor RowParallelLinearImpl::forward(const at::Tensor& x) {
  at::Tensor y = int8_ ? int8_->forward(x) : linear_rows(x, weight);
  return reduce_from_tp_region_owned(std::move(y), options.tp());  // y: this product's own
}

void RowParallelLinearImpl::load_int8_weight(const at::Tensor& q, const at::Tensor& scale) {
  int8_ = int8_of(weight, q, scale);
}

void RowParallelLinearImpl::load_full_weight(const at::Tensor& full) {
  load_into(weight, full, partition_spec(), options.tp());
}

// ---- VocabParallelEmbedding ----------------------------------------------------------------

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions o)
    : options(std::move(o)) {
  int tp = tp_size_of(options.tp());
  ANDY_CHECK_T(
      ConfigError,
      options.padded_vocab_size() % tp == 0 && options.padded_vocab_size() >= options.vocab_size(),
      "VocabParallelEmbedding: padded vocabulary ", options.padded_vocab_size(),
      " must be >= vocab_size ", options.vocab_size(), " and divisible by tensor_parallel_size ",
      tp);
  weight = register_sharded(
      *this,
      seeded_normal({options.vocab_size(), options.dim()}, options.init_std(), options.seed()),
      partition_spec(), options.tp());
}

PartitionSpec VocabParallelEmbeddingImpl::partition_spec() const {
  return PartitionSpec::split(0, options.vocab_size(), options.padded_vocab_size());
}

int64_t VocabParallelEmbeddingImpl::vocab_start() const {
  return shard_offset(partition_spec(), tp_rank_of(options.tp()), tp_size_of(options.tp()));
}

at::Tensor VocabParallelEmbeddingImpl::forward(const at::Tensor& ids) {
  if (!tp_active(options.tp())) return at::embedding(weight, ids);
  int64_t start = vocab_start(), n = local_vocab();
  if (!at::GradMode::is_enabled() && weight.is_cpu() && weight.is_contiguous()) {
    // Inference on CPU: each row this rank's slice holds copied, the others zero, in one pass
    // (the masked ops below take seven), then summed in place.
    const at::Tensor idx = ids.to(at::kLong).contiguous();
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(weight.size(1));
    at::Tensor out = at::empty(shape, weight.options());
    const int64_t* id = idx.data_ptr<int64_t>();
    const size_t row_bytes = static_cast<size_t>(weight.size(1) * weight.element_size());
    const char* w = static_cast<const char*>(weight.data_ptr());
    char* o = static_cast<char*>(out.data_ptr());
    for (int64_t i = 0; i < idx.numel(); ++i, o += row_bytes) {
      const int64_t local = id[i] - start;
      if (local >= 0 && local < n)
        std::memcpy(o, w + static_cast<size_t>(local) * row_bytes, row_bytes);
      else
        std::memset(o, 0, row_bytes);
    }
    return reduce_from_tp_region_owned(std::move(out), options.tp());
  }
  at::Tensor outside = (ids < start).logical_or(ids >= start + n);
  at::Tensor local = (ids - start).masked_fill(outside, 0);
  at::Tensor out = at::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0.0);
  return reduce_from_tp_region(out, options.tp());
}

void VocabParallelEmbeddingImpl::load_full_weight(const at::Tensor& full) {
  load_into(weight, full, partition_spec(), options.tp());
}

}  // namespace andy
