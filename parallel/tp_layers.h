// Megatron-style tensor-parallel layers (no biases: LLaMA has none).
//   ColumnParallelLinear: weight [out/tp, in] (rows of the full [out, in] weight); input
//     replicated, output sharded on its last dim. Forward identity, backward all-reduce of the
//     input gradient (copy_to_tp_region), unless the caller already copied the input.
//   RowParallelLinear: weight [out, in/tp] (columns); input sharded on its last dim, output
//     replicated. Forward all-reduce (reduce_from_tp_region), backward identity.
//   VocabParallelEmbedding: weight [padded_vocab/tp, dim]; ids outside this rank's rows give
//     zero rows, then the partial embeddings are all-reduced.
// A null or size-1 communicator gives the plain single-process layer, communicating nothing.
// Weights start as the full tensor drawn from `seed` (normal(0, init_std)) and then sliced, so
// every TP size gives the same layer; models usually overwrite them with load_full_weight().
//
//   ColumnParallelLinear q(ColumnParallelLinearOptions(dim, n_head * head_dim, tp));
//   RowParallelLinear o(RowParallelLinearOptions(n_head * head_dim, dim, tp));
#pragma once

#include <torch/torch.h>

#include "parallel/communicator.h"
#include "parallel/int8_linear.h"
#include "parallel/tp_partition.h"

namespace andy {

// x [..., in] times weight [out, in]^T, as at::linear; a single fp32 row on CPU goes through a
// matrix-vector product instead (OpenBLAS's sgemm packs the whole weight for one row: decoding
// one sequence of the 25 M model spent 2x longer in its linears), or, outside autograd with
// weights packed in panels (cpu_fp32_panels_on: serving), through the panel kernel like a batch
// of rows, so that a row's result does not depend on the batch; a single bf16 row outside
// autograd through cpu_bf16_gemv; other CPU fp32 rows through cpu_linear (parallel/cpu_gemm.h).
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight);

// The full tensor of `shape` drawn from normal(0, std) with a CPU generator seeded by `seed`.
// Same values on every rank and for every TP size.
at::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed);
// A stable 64-bit seed for the parameter `name` under the run seed (FNV-1a of the name mixed
// with the seed), so that each parameter's draw is independent of construction order.
uint64_t param_seed(uint64_t seed, const std::string& name);

struct ColumnParallelLinearOptions {
  ColumnParallelLinearOptions(int64_t in_features, int64_t out_features, CommPtr tp)
      : in_features_(in_features), out_features_(out_features), tp_(std::move(tp)) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);  // full (unsharded, unpadded) output size
  TORCH_ARG(CommPtr, tp);
  TORCH_ARG(int64_t, padded_out_features) = 0;  // Default: 0 = out_features (must divide by tp)
  TORCH_ARG(bool, copy_input) = true;           // Default: true. false when the caller already
                                                // applied copy_to_tp_region to the input.
  TORCH_ARG(double, init_std) = 0.02;           // Default: 0.02
  TORCH_ARG(uint64_t, seed) = 0;                // Default: 0
};

class ColumnParallelLinearImpl : public torch::nn::Module {
 public:
  explicit ColumnParallelLinearImpl(ColumnParallelLinearOptions options);
  // x [..., in] replicated -> [..., out_local]
  at::Tensor forward(const at::Tensor& x);
  PartitionSpec partition_spec() const;
  // Copies this rank's shard of a full [out, in] weight into `weight`.
  void load_full_weight(const at::Tensor& full);
  // Inference with this rank's int8 shard instead (q int8 [out_local, in], scale [out_local]);
  // `weight` is released. CPU only, no autograd.
  void load_int8_weight(const at::Tensor& q, const at::Tensor& scale);
  int64_t local_out_features() const { return int8_ ? int8_->out_features() : weight.size(0); }
  bool is_int8() const { return int8_ != nullptr; }

  ColumnParallelLinearOptions options;
  at::Tensor weight;
  std::shared_ptr<Int8Linear> int8_;  // set by load_int8_weight
};
TORCH_MODULE(ColumnParallelLinear);

struct RowParallelLinearOptions {
  RowParallelLinearOptions(int64_t in_features, int64_t out_features, CommPtr tp)
      : in_features_(in_features), out_features_(out_features), tp_(std::move(tp)) {}
  TORCH_ARG(int64_t, in_features);  // full input size (divides by tp)
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(CommPtr, tp);
  TORCH_ARG(double, init_std) = 0.02;  // Default: 0.02
  TORCH_ARG(uint64_t, seed) = 0;       // Default: 0
};

class RowParallelLinearImpl : public torch::nn::Module {
 public:
  explicit RowParallelLinearImpl(RowParallelLinearOptions options);
  // x [..., in_local] sharded -> [..., out] replicated (summed over the group).
  at::Tensor forward(const at::Tensor& x);
  PartitionSpec partition_spec() const;
  void load_full_weight(const at::Tensor& full);
  // As ColumnParallelLinear's: q int8 [out, in_local], scale [out] (whole rows' scales).
  void load_int8_weight(const at::Tensor& q, const at::Tensor& scale);

  RowParallelLinearOptions options;
  at::Tensor weight;
  std::shared_ptr<Int8Linear> int8_;  // set by load_int8_weight
};
TORCH_MODULE(RowParallelLinear);

struct VocabParallelEmbeddingOptions {
  VocabParallelEmbeddingOptions(int64_t vocab_size, int64_t padded_vocab_size, int64_t dim,
                                CommPtr tp)
      : vocab_size_(vocab_size),
        padded_vocab_size_(padded_vocab_size),
        dim_(dim),
        tp_(std::move(tp)) {}
  TORCH_ARG(int64_t, vocab_size);         // real vocabulary (rows of the full weight)
  TORCH_ARG(int64_t, padded_vocab_size);  // multiple of tp; rows >= vocab_size are zero
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(CommPtr, tp);
  TORCH_ARG(double, init_std) = 0.02;  // Default: 0.02
  TORCH_ARG(uint64_t, seed) = 0;       // Default: 0
};

class VocabParallelEmbeddingImpl : public torch::nn::Module {
 public:
  explicit VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options);
  // ids [...] (int64, global ids) -> [..., dim] replicated.
  at::Tensor forward(const at::Tensor& ids);
  PartitionSpec partition_spec() const;
  void load_full_weight(const at::Tensor& full);  // full: [vocab_size, dim]
  // This rank's rows: global ids [vocab_start(), vocab_start() + local_vocab()).
  int64_t vocab_start() const;
  int64_t local_vocab() const { return weight.size(0); }

  VocabParallelEmbeddingOptions options;
  at::Tensor weight;
};
TORCH_MODULE(VocabParallelEmbedding);

}  // namespace andy
