// Split/merge of full tensors into TP shards (see tp_partition.h for the layout convention).
#include "parallel/tp_partition.h"

#include "core/base/error.h"
#include "parallel/tp_ops.h"

namespace andy {

namespace {

void check_spec(const at::Tensor& t, const PartitionSpec& spec, int tp_size,
                const std::string& what) {
  if (spec.replicated()) return;
  ANDY_CHECK(spec.dim < t.dim(), what, ": split dim ", spec.dim, " but the tensor has ", t.dim(),
             " dims");
  ANDY_CHECK(spec.padded_size >= spec.full_size && spec.padded_size % tp_size == 0, what,
             ": padded size ", spec.padded_size, " along dim ", spec.dim,
             " is not a multiple of tensor_parallel_size ", tp_size, " at least the full size ",
             spec.full_size);
}

}  // namespace

int64_t shard_offset(const PartitionSpec& spec, int tp_rank, int tp_size) {
  return spec.replicated() ? 0 : tp_rank * (spec.padded_size / tp_size);
}

at::Tensor shard_tensor(const at::Tensor& full, const PartitionSpec& spec, int tp_rank,
                        int tp_size) {
  if (spec.replicated()) return full.clone(at::MemoryFormat::Contiguous);
  check_spec(full, spec, tp_size, "shard_tensor");
  ANDY_CHECK(full.size(spec.dim) == spec.full_size, "shard_tensor: size ", full.size(spec.dim),
             " along dim ", spec.dim, " but the partition spec says ", spec.full_size, " (shape ",
             full.sizes(), ")");
  int64_t n = spec.padded_size / tp_size;
  int64_t start = shard_offset(spec, tp_rank, tp_size);
  int64_t real = std::max<int64_t>(0, std::min(n, spec.full_size - start));
  std::vector<int64_t> shape(full.sizes().begin(), full.sizes().end());
  shape[spec.dim] = n;
  at::Tensor out = at::zeros(shape, full.options());
  if (real > 0) out.narrow(spec.dim, 0, real).copy_(full.narrow(spec.dim, start, real));
  return out;
}

at::Tensor merge_shards(const std::vector<at::Tensor>& shards, const PartitionSpec& spec) {
  ANDY_CHECK(!shards.empty(), "merge_shards: no shards");
  if (spec.replicated()) return shards[0].clone(at::MemoryFormat::Contiguous);
  check_spec(shards[0], spec, static_cast<int>(shards.size()), "merge_shards");
  at::Tensor cat = at::cat(shards, spec.dim);
  ANDY_CHECK(cat.size(spec.dim) == spec.padded_size, "merge_shards: ", shards.size(),
             " shards give size ", cat.size(spec.dim), " along dim ", spec.dim, ", expected ",
             spec.padded_size);
  return cat.narrow(spec.dim, 0, spec.full_size).contiguous();
}

StateDict split_state_dict(const StateDict& full, const PartitionSpecs& specs, int tp_rank,
                           int tp_size) {
  StateDict out;
  for (const auto& [name, t] : full) {
    auto it = specs.find(name);
    ANDY_CHECK(it != specs.end(), "split_state_dict: no partition spec for tensor '", name, "'");
    try {
      out[name] = shard_tensor(t, it->second, tp_rank, tp_size);
    } catch (const Error& e) {
      ANDY_THROW(Error, "split_state_dict: tensor '", name, "': ", e.what());
    }
  }
  for (const auto& [name, spec] : specs)
    ANDY_CHECK(full.count(name), "split_state_dict: the state dict lacks tensor '", name, "'");
  return out;
}

StateDict merge_state_dicts(const std::vector<StateDict>& shards, const PartitionSpecs& specs) {
  ANDY_CHECK(!shards.empty(), "merge_state_dicts: no shards");
  StateDict out;
  for (const auto& [name, spec] : specs) {
    std::vector<at::Tensor> parts;
    for (size_t r = 0; r < shards.size(); ++r) {
      auto it = shards[r].find(name);
      ANDY_CHECK(it != shards[r].end(), "merge_state_dicts: shard ", r, " lacks tensor '", name,
                 "'");
      parts.push_back(it->second);
    }
    out[name] = merge_shards(parts, spec);
  }
  return out;
}

StateDict gather_full_state_dict(const StateDict& local, const PartitionSpecs& specs,
                                 const CommPtr& tp) {
  StateDict out;
  int tp_size = tp_size_of(tp);
  for (const auto& [name, spec] : specs) {
    auto it = local.find(name);
    ANDY_CHECK(it != local.end(), "gather_full_state_dict: no local tensor '", name, "'");
    const at::Tensor& t = it->second;
    if (spec.replicated()) {
      out[name] = t.detach().clone(at::MemoryFormat::Contiguous);
      continue;
    }
    std::vector<at::Tensor> parts;
    if (tp_active(tp)) {
      at::Tensor in = t.detach().contiguous();
      std::vector<int64_t> shape{tp_size};
      for (int64_t s : in.sizes()) shape.push_back(s);
      at::Tensor all = at::empty(shape, in.options());
      tp->all_gather(all, in)->wait();
      for (int r = 0; r < tp_size; ++r) parts.push_back(all[r]);
    } else {
      parts.push_back(t.detach());
    }
    out[name] = merge_shards(parts, spec);
  }
  return out;
}

}  // namespace andy
