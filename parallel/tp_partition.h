// The one partitioning module: maps a full (unsharded) state dict to one TP rank's shard and
// back. Used on load (split), for export and checkpoint reshaping (merge), by the server
// (split a full checkpoint onto its ranks) and by the model's deterministic initialisation
// (full weights drawn from the seed, then split).
//
// Convention: a sharded tensor is cut into tp equal contiguous chunks along `dim`, rank r
// holding chunk r. When `full_size` along `dim` does not divide by tp (the vocabulary), the
// full tensor is first zero-padded along `dim` to `padded_size`; merge drops the padding again,
// so full state dicts never carry padding (they are Hugging Face shaped).
//
//   PartitionSpecs specs = llama_partition_specs(cfg, tp);        // core/model
//   StateDict shard = split_state_dict(full, specs, tp_rank, tp);
//   StateDict back  = merge_state_dicts({shard0, shard1}, specs);   // == full
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace andy {

// How one named parameter is laid out across the TP group.
struct PartitionSpec {
  int dim = -1;             // split dimension; -1: replicated on every TP rank
  int64_t full_size = 0;    // size along `dim` in the full tensor (unpadded)
  int64_t padded_size = 0;  // size along `dim` after padding; a multiple of tp
  bool replicated() const { return dim < 0; }

  static PartitionSpec replicate() { return {}; }
  // Split along `dim`; `padded` defaults to `full` (must then divide by tp).
  static PartitionSpec split(int dim, int64_t full, int64_t padded = 0) {
    return {dim, full, padded > 0 ? padded : full};
  }
};

// Ordered by name (std::map), so iteration order is the same on every rank.
using StateDict = std::map<std::string, at::Tensor>;
using PartitionSpecs = std::map<std::string, PartitionSpec>;

// Where rank `tp_rank`'s chunk starts along spec.dim (in the padded tensor): the one place the
// shard-offset formula lives. 0 for a replicated tensor.
int64_t shard_offset(const PartitionSpec& spec, int tp_rank, int tp_size);

// Rank `tp_rank`'s chunk of `full` (a fresh contiguous tensor). Throws Error on a shape that
// does not match the spec.
at::Tensor shard_tensor(const at::Tensor& full, const PartitionSpec& spec, int tp_rank,
                        int tp_size);
// Concatenates the chunks of every rank (rank order) and drops padding.
at::Tensor merge_shards(const std::vector<at::Tensor>& shards, const PartitionSpec& spec);

// Splits every entry of `full` that `specs` names (a name missing from specs, or a spec
// without a tensor, throws Error naming it).
StateDict split_state_dict(const StateDict& full, const PartitionSpecs& specs, int tp_rank,
                           int tp_size);
// Inverse of split_state_dict: `shards[r]` is rank r's state dict. Replicated entries are
// taken from rank 0.
StateDict merge_state_dicts(const std::vector<StateDict>& shards, const PartitionSpecs& specs);

// Collective over `tp` (every rank calls it with the same names): gathers this rank's shards
// into full tensors, on every rank. With a null or size-1 group it only drops padding.
StateDict gather_full_state_dict(const StateDict& local, const PartitionSpecs& specs,
                                 const CommPtr& tp);

}  // namespace andy
