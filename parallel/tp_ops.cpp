// Autograd functions behind copy_to/reduce_from/gather_from_tp_region. The communicator is
// passed through ctx->saved_data as an integer address (IValue cannot hold a raw pointer);
// callers guarantee it outlives the graph (see tp_ops.h).
#include "parallel/tp_ops.h"

#include <torch/torch.h>

#include <cstdint>

namespace andy {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t comm_to_int(Communicator* c) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(c)); }
Communicator* comm_from_ctx(AutogradContext* ctx) {
  return reinterpret_cast<Communicator*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
}

at::Tensor all_reduce_copy(const at::Tensor& x, Communicator* comm) {
  at::Tensor y = x.clone(at::MemoryFormat::Contiguous);
  comm->all_reduce_sync(y);
  return y;
}

// The gathered [tp, ..., n] as [..., tp * n]: each rank's slice side by side in the last dim.
at::Tensor concat_last_dim(const at::Tensor& gathered) {
  const int64_t d = gathered.dim() - 1;  // the input's dims
  std::vector<int64_t> perm;
  for (int64_t i = 1; i < d; ++i) perm.push_back(i);
  perm.push_back(0);
  perm.push_back(d);
  std::vector<int64_t> shape(gathered.sizes().begin() + 1, gathered.sizes().end());
  shape.back() *= gathered.size(0);
  return gathered.permute(perm).reshape(shape);
}

at::Tensor all_gather_last_dim(const at::Tensor& x, Communicator* comm) {
  at::Tensor in = x.contiguous();
  std::vector<int64_t> shape{comm->size()};
  for (int64_t s : in.sizes()) shape.push_back(s);
  at::Tensor out = at::empty(shape, in.options());
  comm->all_gather(out, in)->wait();
  return concat_last_dim(out);
}

struct CopyToTpRegion : public torch::autograd::Function<CopyToTpRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, Communicator* comm) {
    ctx->saved_data["comm"] = comm_to_int(comm);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_reduce_copy(grads[0], comm_from_ctx(ctx)), at::Tensor()};
  }
};

struct ReduceFromTpRegion : public torch::autograd::Function<ReduceFromTpRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, Communicator* comm) {
    return all_reduce_copy(x, comm);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};

struct GatherFromTpRegion : public torch::autograd::Function<GatherFromTpRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, Communicator* comm) {
    ctx->saved_data["comm"] = comm_to_int(comm);
    ctx->saved_data["local"] = x.size(-1);
    return all_gather_last_dim(x, comm);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Communicator* comm = comm_from_ctx(ctx);
    int64_t n = ctx->saved_data["local"].toInt();
    return {grads[0].narrow(-1, comm->rank() * n, n).contiguous(), at::Tensor()};
  }
};

}  // namespace

at::Tensor copy_to_tp_region(const at::Tensor& x, const CommPtr& tp) {
  if (!tp_active(tp)) return x;
  return CopyToTpRegion::apply(x, tp.get());
}

at::Tensor reduce_from_tp_region(const at::Tensor& x, const CommPtr& tp) {
  if (!tp_active(tp)) return x;
  return ReduceFromTpRegion::apply(x, tp.get());
}

at::Tensor reduce_from_tp_region_owned(at::Tensor x, const CommPtr& tp) {
  if (!tp_active(tp)) return x;
  if (at::GradMode::is_enabled() && x.requires_grad()) return ReduceFromTpRegion::apply(x, tp.get());
  if (!x.is_contiguous()) x = x.contiguous();
  tp->all_reduce_sync(x);
  return x;
}

at::Tensor gather_to_tp_root(const at::Tensor& x, const CommPtr& tp) {
  if (!tp_active(tp)) return x;
  const at::Tensor in = x.contiguous();
  const bool root = tp->rank() == 0;
  std::vector<int64_t> shape{tp->size()};
  for (int64_t s : in.sizes()) shape.push_back(s);
  at::Tensor out = root ? at::empty(shape, in.options()) : at::Tensor();
  tp->gather(out, in, 0)->wait();
  return root ? concat_last_dim(out) : at::Tensor();
}

at::Tensor gather_from_tp_region(const at::Tensor& x, const CommPtr& tp) {
  if (!tp_active(tp)) return x;
  return GatherFromTpRegion::apply(x, tp.get());
}

}  // namespace andy
