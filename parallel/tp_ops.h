// Tensor-parallel communication regions as autograd functions over a TP Communicator
// (Megatron-LM's mappings). Convention: a null communicator or a group of size 1 means "no
// tensor parallelism": every op is then the identity and nothing is communicated.
// Backward collectives run inside autograd's backward pass; LibTorch's engine runs the CPU
// graph in one thread in a deterministic order, so every TP rank issues them in the same order
// (the Communicator contract). The communicator must outlive the graph built with it.
//
//   at::Tensor xc = copy_to_tp_region(x, tp);      // identity fwd, all-reduce of grad bwd
//   at::Tensor y  = reduce_from_tp_region(p, tp);  // all-reduce fwd, identity bwd
#pragma once

#include <ATen/ATen.h>

#include "parallel/communicator.h"

namespace andy {

// True when `tp` is a real group (non-null, more than one rank).
inline bool tp_active(const CommPtr& tp) { return tp && tp->size() > 1; }
inline int tp_size_of(const CommPtr& tp) { return tp ? tp->size() : 1; }
inline int tp_rank_of(const CommPtr& tp) { return tp ? tp->rank() : 0; }

// Identity forward; backward sums the input gradient over the group (the "f" of Megatron).
// Used in front of column-parallel layers whose input is replicated.
at::Tensor copy_to_tp_region(const at::Tensor& x, const CommPtr& tp);
// Sums over the group forward; identity backward (the "g" of Megatron). Used after
// row-parallel layers and the vocab-parallel embedding.
at::Tensor reduce_from_tp_region(const at::Tensor& x, const CommPtr& tp);
// The same sum for an x the caller hands over (a product's fresh output, used nowhere else):
// without a gradient to track (inference) it is summed in x's own storage, with no copy;
// otherwise as reduce_from_tp_region.
at::Tensor reduce_from_tp_region_owned(at::Tensor x, const CommPtr& tp);
// Concatenates every rank's x along the last dimension (forward all-gather); backward keeps
// this rank's slice of the gradient. Used where full logits are needed (sampling, tests).
at::Tensor gather_from_tp_region(const at::Tensor& x, const CommPtr& tp);
// The same concatenation on the group's rank 0 only (a gather, not an all-gather: half the bytes
// at two ranks, and no copy to permute on the others); an undefined tensor on the other ranks.
// No autograd. Used where one rank samples from the logits (the serving engine).
at::Tensor gather_to_tp_root(const at::Tensor& x, const CommPtr& tp);

}  // namespace andy
