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
  GradReducerOptions& set_bucket_mb(double v) { bucket_mb = v; return *this; }
  GradReducerOptions& set_first_bucket_mb(double v) { first_bucket_mb = v; return *this; }
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

 private:
  struct Bucket {
    std::vector<size_t> params;
    std::vector<int64_t> offsets;
    int64_t numel = 0;
    at::Tensor flat;
    size_t ready = 0;
    WorkPtr work;
  };
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
  bool sync_ = false;
  bool repack_ = false;   // a parameter got two gradients in one backward
  bool pending_ = false;  // a synced backward ran and finish() has not yet
  GradReducerStats stats_;
  std::shared_ptr<bool> alive_;
};

}  // namespace andy
