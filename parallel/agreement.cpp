// Agreement on the first failing rank, over MPI or a Communicator (see agreement.h).
#include "parallel/agreement.h"

#include "core/base/error.h"

namespace andy {

FailureKind failure_kind_of(const std::exception& e) {
  if (dynamic_cast<const ConfigError*>(&e)) return FailureKind::kConfig;
  if (dynamic_cast<const IoError*>(&e)) return FailureKind::kIo;
  if (dynamic_cast<const CommError*>(&e)) return FailureKind::kComm;
  return FailureKind::kOther;
}

void agree_or_throw_first_failure(const AgreementTransport& t, FailureKind kind, const std::string& message,
                                  const std::function<void()>& on_failure) {
  const bool failed = kind != FailureKind::kNone;
  const int first = t.size <= 1 ? (failed ? t.rank : t.size) : t.min_over_ranks(failed ? t.rank : t.size);
  if (first == t.size) return;
  // [kind, characters...] of the first failing rank.
  std::vector<int32_t> wire;
  if (t.rank == first) {
    wire.push_back(static_cast<int32_t>(kind));
    for (unsigned char c : message) wire.push_back(c);
  }
  if (t.size > 1) t.broadcast_ints(wire, first);
  std::string text;
  for (size_t i = 1; i < wire.size(); ++i) text.push_back(static_cast<char>(wire[i]));
  if (on_failure) on_failure();
  const bool report = t.rank == first;
  switch (static_cast<FailureKind>(wire.empty() ? 4 : wire[0])) {
    case FailureKind::kConfig: throw Agreed<ConfigError>(text, report);
    case FailureKind::kIo: throw Agreed<IoError>(text, report);
    case FailureKind::kComm: throw Agreed<CommError>(text, report);
    default: throw Agreed<Error>(text, report);
  }
}

void all_reduce_host(Communicator* c, at::Tensor& t, ReduceOp op, at::Device device) {
  if (!c || c->size() <= 1) return;
  if (c->backend() == Backend::kNccl) {
    at::Tensor d = t.to(device);
    c->all_reduce_sync(d, op);
    t.copy_(d.cpu());
  } else {
    c->all_reduce_sync(t, op);
  }
}

void broadcast_host(Communicator* c, at::Tensor& t, int root, at::Device device) {
  if (!c || c->size() <= 1) return;
  if (c->backend() == Backend::kNccl) {
    at::Tensor d = t.to(device);
    c->broadcast_sync(d, root);
    t.copy_(d.cpu());
  } else {
    c->broadcast_sync(t, root);
  }
}

AgreementTransport communicator_transport(Communicator* c, at::Device device) {
  AgreementTransport t;
  t.rank = c ? c->rank() : 0;
  t.size = c ? c->size() : 1;
  t.min_over_ranks = [c, device](int v) {
    at::Tensor x = at::full({1}, v, at::kInt);
    all_reduce_host(c, x, ReduceOp::kMin, device);
    return x.item<int>();
  };
  t.broadcast_ints = [c, device](std::vector<int32_t>& values, int root) {
    at::Tensor n = at::full({1}, static_cast<int32_t>(values.size()), at::kInt);
    broadcast_host(c, n, root, device);
    at::Tensor data = at::zeros({std::max(1, n.item<int>())}, at::kInt);
    if (c->rank() == root && !values.empty())
      std::copy(values.begin(), values.end(), data.data_ptr<int32_t>());
    broadcast_host(c, data, root, device);
    values.assign(data.data_ptr<int32_t>(), data.data_ptr<int32_t>() + n.item<int>());
  };
  return t;
}

void agree_on_error(Communicator* c, at::Device device, const std::string& local_error,
                    const std::function<void()>& on_failure) {
  agree_or_throw_first_failure(communicator_transport(c, device),
                               local_error.empty() ? FailureKind::kNone : FailureKind::kIo, local_error, on_failure);
}

}  // namespace andy
