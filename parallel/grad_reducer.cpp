// Bucketed, hook-driven DP gradient all-reduce (see grad_reducer.h).
#include "parallel/grad_reducer.h"

#include <torch/torch.h>

#include <chrono>

#include "core/base/error.h"

namespace andy {

GradReducer::GradReducer(std::vector<at::Tensor> params, CommPtr dp, GradReducerOptions opts)
    : params_(std::move(params)), dp_(std::move(dp)), shard_(opts.shard) {
  alive_ = std::make_shared<bool>(true);
  where_.assign(params_.size(), {-1, -1});
  seen_.assign(params_.size(), false);
  if (!active()) return;
  // Buckets hold fp32 elements: MiB -> element counts.
  constexpr double kFloatsPerMiB = 1024.0 * 1024.0 / sizeof(float);
  const int64_t first_cap = std::max<int64_t>(1, static_cast<int64_t>(opts.first_bucket_mb * kFloatsPerMiB));
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(opts.bucket_mb * kFloatsPerMiB));
  // Reverse registration order: the output side of the network gets its gradients first.
  for (size_t k = params_.size(); k-- > 0;) {
    const at::Tensor& p = params_[k];
    ANDY_CHECK(p.requires_grad(), "GradReducer: parameter ", k, " does not require grad");
    int64_t limit = buckets_.size() <= 1 ? first_cap : cap;  // the open bucket's capacity
    if (buckets_.empty() || (buckets_.back().numel > 0 && buckets_.back().numel + p.numel() > limit)) {
      buckets_.emplace_back();
    }
    Bucket& b = buckets_.back();
    where_[k] = {static_cast<int>(buckets_.size() - 1), static_cast<int>(b.params.size())};
    b.params.push_back(k);
    b.offsets.push_back(b.numel);
    b.numel += p.numel();
  }
  const int64_t ranks = dp_->size();
  for (auto& b : buckets_) {
    b.padded = shard_ ? (b.numel + ranks - 1) / ranks * ranks : b.numel;
    b.flat = at::zeros({b.padded}, params_[b.params[0]].options().dtype(at::kFloat));
  }
  if (shard_) setup_shards();
  std::weak_ptr<bool> alive = alive_;
  for (size_t k = 0; k < params_.size(); ++k) {
    params_[k].register_hook([this, k, alive](const at::Tensor& grad) -> at::Tensor {
      return alive.lock() ? on_grad(k, grad) : at::Tensor();
    });
  }
}

GradReducer::~GradReducer() {
  // Hooks stay registered on the parameters; they check `alive_` and do nothing afterwards.
  alive_.reset();
}

void GradReducer::setup_shards() {
  at::NoGradGuard no_grad;
  const int64_t dp = dp_->size(), me = dp_->rank();
  for (size_t bi = 0; bi < buckets_.size(); ++bi) {
    Bucket& b = buckets_[bi];
    const at::Tensor& first = params_[b.params[0]];
    b.params_flat = at::zeros({b.padded}, first.options().dtype(at::kFloat));
    const int64_t shard = b.padded / dp, lo = me * shard, hi = lo + shard;
    b.grad_shard = at::zeros({shard}, b.params_flat.options());
    for (size_t s = 0; s < b.params.size(); ++s) {
      at::Tensor& p = params_[b.params[s]];
      ANDY_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.device() == first.device(),
                 "GradReducer: the distributed optimizer needs contiguous fp32 parameters on one device; parameter ",
                 b.params[s], " is ", p.scalar_type(), " on ", p.device());
      at::Tensor view = b.params_flat.narrow(0, b.offsets[s], p.numel()).view(p.sizes());
      view.copy_(p);
      p.set_data(view);  // the parameter now lives in the bucket's flat buffer
      const int64_t a = std::max(lo, b.offsets[s]), e = std::min(hi, b.offsets[s] + p.numel());
      if (e <= a) continue;
      ShardSegment seg;
      seg.param = b.params[s];
      seg.bucket = static_cast<int>(bi);
      seg.param_offset = a - b.offsets[s];
      seg.shard_offset = a - lo;
      seg.numel = e - a;
      seg.param_part = b.params_flat.narrow(0, a, e - a);
      seg.grad_part = b.grad_shard.narrow(0, a - lo, e - a);
      segments_.push_back(std::move(seg));
    }
  }
}

void GradReducer::start_param_gather(int bi) {
  if (!sharded()) return;
  Bucket& b = buckets_.at(bi);
  if (b.gather) return;
  const int64_t shard = b.padded / dp_->size();
  b.gather = dp_->all_gather(b.params_flat, b.params_flat.narrow(0, dp_->rank() * shard, shard));
}

void GradReducer::gather_params() {
  if (!sharded()) return;
  for (int b = 0; b < num_buckets(); ++b) start_param_gather(b);
  for (auto& b : buckets_) {
    b.gather->wait();
    b.gather.reset();
  }
}

void GradReducer::set_sync(bool sync) { sync_ = sync; }

std::vector<size_t> GradReducer::bucket_params(int b) const { return buckets_.at(b).params; }
int64_t GradReducer::bucket_numel(int b) const { return buckets_.at(b).numel; }

bool GradReducer::grad_is_bucket_view(size_t k) const {
  const at::Tensor& g = params_[k].grad();
  if (!g.defined()) return false;
  auto [bi, slot] = where_[k];
  const Bucket& b = buckets_[bi];
  return g.data_ptr() == static_cast<const float*>(b.flat.data_ptr()) + b.offsets[slot];
}

at::Tensor GradReducer::on_grad(size_t k, const at::Tensor& grad) {
  if (!sync_ || !active()) return {};
  pending_ = true;
  auto [bi, slot] = where_[k];
  Bucket& b = buckets_[bi];
  if (seen_[k]) {  // a second gradient for one parameter: finish() repacks everything
    repack_ = true;
    // If .grad is this bucket's slice, autograd is about to add the new gradient into it in
    // place: the bucket's all-reduce must not be running then. Once it is done, the slice holds
    // the average of the first gradients; finish() repacks it as .grad (the average plus the
    // new gradient) and averages again, which gives the average of the sums.
    if (grad_is_bucket_view(k) && b.work) b.work->wait();
    return {};
  }
  seen_[k] = true;
  at::NoGradGuard no_grad;
  at::Tensor& p = params_[k];
  at::Tensor dst = b.flat.narrow(0, b.offsets[slot], p.numel()).view(p.sizes());
  // .grad still the slice from an earlier step (nobody reset it): a copy, so that autograd's
  // in-place accumulation below goes there and not into the bucket being packed.
  if (grad_is_bucket_view(k)) p.mutable_grad() = p.grad().clone();
  at::Tensor prev = p.grad();
  at::Tensor replace;
  if (prev.defined()) {
    at::add_out(dst, prev.to(at::kFloat), grad.to(at::kFloat));
  } else {
    dst.copy_(grad);
    // Autograd keeps the returned slice as .grad when the layouts agree (contiguous fp32).
    if (grad.scalar_type() == at::kFloat && p.scalar_type() == at::kFloat && p.is_contiguous()) replace = dst;
  }
  if (++b.ready == b.params.size()) {
    launch(b);
    ++stats_.buckets_launched_in_backward;
  }
  progress();
  return replace;
}

void GradReducer::pack_from_grads(Bucket& b) {
  for (size_t s = 0; s < b.params.size(); ++s) {
    const at::Tensor& p = params_[b.params[s]];
    if (grad_is_bucket_view(b.params[s])) continue;  // already there
    at::Tensor dst = b.flat.narrow(0, b.offsets[s], p.numel()).view(p.sizes());
    if (p.grad().defined()) dst.copy_(p.grad());
    else dst.zero_();
  }
}

void GradReducer::launch(Bucket& b) {
  if (shard_) {
    b.work = dp_->reduce_scatter(b.grad_shard, b.flat, {ReduceOp::kAvg});
    return;
  }
  b.work = dp_->all_reduce(b.flat, {ReduceOp::kAvg});
}

void GradReducer::progress() {
  // Completes the buckets already reduced (cheap test, no wait); on the MPI backend's
  // nonblocking fallback this also drives MPI's progress engine.
  for (auto& b : buckets_)
    if (b.work) b.work->is_completed();
}

double GradReducer::finish() {
  if (!active() || !sync_ || !pending_) {
    sync_ = false;
    return 0;
  }
  at::NoGradGuard no_grad;
  auto t0 = std::chrono::steady_clock::now();
  for (auto& b : buckets_) {
    if (b.work) continue;
    // Some parameter of this bucket got no hook call (unused in this backward): pack .grad.
    pack_from_grads(b);
    launch(b);
    ++stats_.buckets_launched_in_finish;
  }
  if (repack_) {
    for (auto& b : buckets_) b.work->wait();
    for (auto& b : buckets_) {
      pack_from_grads(b);
      launch(b);
    }
    repack_ = false;
  }
  for (auto& b : buckets_) {
    b.work->wait();
    // Sharded: this rank's averaged shard is in grad_shard; .grad keeps the local gradients.
    for (size_t s = 0; s < b.params.size() && !shard_; ++s) {
      at::Tensor& p = params_[b.params[s]];
      if (grad_is_bucket_view(b.params[s])) continue;  // averaged in place
      at::Tensor src = b.flat.narrow(0, b.offsets[s], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(src);
      } else {
        p.mutable_grad() = src.to(p.scalar_type()).clone();
      }
    }
    b.work.reset();
    b.ready = 0;
  }
  std::fill(seen_.begin(), seen_.end(), false);
  pending_ = false;
  sync_ = false;
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.wait_seconds += waited;
  return waited;
}

}  // namespace andy
