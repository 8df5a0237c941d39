// GradReducer: data-parallel gradient averaging (LibTorch's C++ API has no
// DistributedDataParallel). Parameters are packed, in reverse registration order (roughly the
// order backward produces their gradients), into flat fp32 buckets of about `bucket_mb` MiB; the
// first bucket is small (first_bucket_mb) so communication starts early. A hook on each
// parameter copies its gradient into its bucket as soon as autograd has it; when the last
// gradient of a bucket arrives the bucket's asynchronous all-reduce (average over the DP group)
// is launched, so communication overlaps the rest of backward. finish() waits for every bucket
// and writes the averaged values back into param.grad().
// Gradients as bucket views (as PyTorch DDP's gradient_as_bucket_view): when a parameter has
// no .grad yet (the trainer resets them to none each step) and its gradient is fp32, the hook
// hands autograd the bucket's slice in place of the gradient it packed, so AccumulateGrad keeps
// that slice as param.grad(): the all-reduce then averages .grad in place and finish() copies
// nothing back for it (100 MB per step for a 25 M parameter model, and that much less memory).
// A .grad that is a view stays valid until the next synced backward repacks the bucket.
// Convention: gradients accumulate in param.grad() across micro-steps as usual; only the
// backward of a step marked with set_sync(true) (the last accumulation micro-step) reduces
// anything: the hook then packs grad() + this micro-step's gradient. Non-final micro-steps
// communicate nothing.
// Sharded (options.shard, ZeRO-1 as Megatron-LM's distributed optimizer; DP > 1 only): each
// bucket is padded to a multiple of the DP size and reduce-scattered instead of all-reduced, so
// DP rank r receives the average of the r-th 1/dp of the bucket (its shard) and param.grad()
// keeps this rank's own (unaveraged) gradients. The parameters are moved into one flat buffer
// per bucket (each param becomes a view of it, set_data) so that after the optimizer updated
// this rank's shard, gather_params() all-gathers every bucket's shard in place.
// shard_segments() lists the pieces of parameters this rank owns: for each, views of the
// parameter's elements and of their averaged gradient.
// Not thread-safe; the DP communicator must outlive the reducer. A null or size-1 DP group
// makes every call a no-op. Every DP rank must run the same backward (the Communicator
// contract).
//
//   GradReducer reducer(params, grid.dp_ptr(), GradReducerOptions().set_bucket_mb(25));
//   reducer.set_sync(micro == accum - 1);
//   loss.backward();
//   if (micro == accum - 1) reducer.finish();   // param.grad() now holds the DP average
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace andy {

struct GradReducerOptions {
  double bucket_mb = 25.0;       // Default: 25 MiB
  double first_bucket_mb = 1.0;  // Default: 1 MiB (PyTorch DDP's first bucket)
  bool shard = false;             // Default: all-reduce (no ZeRO)
  GradReducerOptions& set_bucket_mb(double v) { bucket_mb = v; return *this; }
  GradReducerOptions& set_first_bucket_mb(double v) { first_bucket_mb = v; return *this; }
  GradReducerOptions& set_shard(bool v) { shard = v; return *this; }
};

// A piece of parameter `param` (index into the reducer's parameters) that this DP rank owns:
// elements [param_offset, param_offset + numel) of it, at [shard_offset, shard_offset + numel)
// of its bucket's shard.
struct ShardSegment {
  size_t param = 0;
  int bucket = 0;
  int64_t param_offset = 0, shard_offset = 0, numel = 0;
  at::Tensor param_part;  // view of the parameter's elements (flat)
  at::Tensor grad_part;   // view of their DP-averaged gradient (valid after finish())
};

struct GradReducerStats {
  int64_t buckets_launched_in_backward = 0;  // launched from hooks (overlapped)
  int64_t buckets_launched_in_finish = 0;    // completed by finish() (a param had no grad)
  double wait_seconds = 0;                   // time finish() blocked on communication
};

class GradReducer {
 public:
  GradReducer(std::vector<at::Tensor> params, CommPtr dp, GradReducerOptions opts = {});
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Whether the next backward reduces (true on the last accumulation micro-step).
  void set_sync(bool sync);
  // Launches buckets not yet launched, waits for all, copies averages into param.grad().
  // Returns the seconds spent waiting. No-op unless set_sync(true) preceded the backward.
  double finish();

  int num_buckets() const { return static_cast<int>(buckets_.size()); }
  // Parameter indexes (into the constructor's vector) of bucket b, in packing order.
  std::vector<size_t> bucket_params(int b) const;
  int64_t bucket_numel(int b) const;
  const GradReducerStats& stats() const { return stats_; }
  bool active() const { return dp_ && dp_->size() > 1; }

  // ZeRO-1 (see above). sharded(): options.shard with an active DP group.
  bool sharded() const { return active() && shard_; }
  const std::vector<ShardSegment>& shard_segments() const { return segments_; }
  // Elements of each DP rank's shard of bucket b (the padded bucket / dp).
  int64_t shard_numel(int b) const { return buckets_.at(b).padded / dp_->size(); }
  // Offset of parameter `slot` of bucket b inside the bucket (bucket_params' order).
  int64_t bucket_param_offset(int b, size_t slot) const { return buckets_.at(b).offsets.at(slot); }
  const CommPtr& dp() const { return dp_; }
  // All-gathers bucket b's parameter shard (after this rank's optimizer update of it), so that
  // every DP rank holds its updated parameters again; gather_params() starts those of the
  // buckets not started yet and waits for all. Collective over DP (every rank starts the same
  // buckets in the same order).
  void start_param_gather(int b);
  void gather_params();

 private:
  struct Bucket {
    std::vector<size_t> params;
    std::vector<int64_t> offsets;
    int64_t numel = 0;
    at::Tensor flat;
    size_t ready = 0;
    WorkPtr work;
    // Sharded: numel rounded up to a multiple of dp; the parameters' flat buffer (padded) and
    // this rank's averaged gradient shard.
    int64_t padded = 0;
    at::Tensor params_flat, grad_shard;
    WorkPtr gather;
  };
  void setup_shards();
  // Returns the tensor autograd should accumulate in place of `grad` (the bucket's slice), or an
  // undefined tensor to keep `grad`.
  at::Tensor on_grad(size_t param_index, const at::Tensor& grad);
  // Whether param k's .grad is its slice of the bucket (shares the bucket's memory).
  bool grad_is_bucket_view(size_t k) const;
  void launch(Bucket& b);
  // Copies every parameter's .grad (zeros where undefined) into the bucket's flat buffer.
  void pack_from_grads(Bucket& b);
  void progress();

  std::vector<at::Tensor> params_;
  CommPtr dp_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<int, int>> where_;  // param index -> (bucket, slot)
  std::vector<bool> seen_;
  bool shard_ = false;
  std::vector<ShardSegment> segments_;
  bool sync_ = false;
  bool repack_ = false;   // a parameter got two gradients in one backward
  bool pending_ = false;  // a synced backward ran and finish() has not yet
  GradReducerStats stats_;
  std::shared_ptr<bool> alive_;
};

}  // namespace andy
