// Argument checks shared by every Communicator backend.
#include "parallel/communicator.h"

#include <numeric>

#include "core/base/error.h"

namespace andy {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

const char* backend_name(Backend b) { return b == Backend::kMpi ? "mpi" : "nccl"; }

std::string Communicator::describe(const char* op) const {
  return std::string(op) + " on " + name_ + " (group rank " + std::to_string(rank_) + " of " +
         std::to_string(size_) + ", world rank " + std::to_string(global_rank_) + ", " +
         backend_name(backend()) + ")";
}

void Communicator::check_tensor(const at::Tensor& t, const char* op, const char* what) const {
  ANDY_CHECK_T(CommError, t.defined(), describe(op), ": ", what, " tensor is undefined");
  ANDY_CHECK_T(CommError, t.is_contiguous(), describe(op), ": ", what,
               " tensor must be contiguous (call .contiguous() first); sizes ", t.sizes());
  switch (t.scalar_type()) {
    case at::kFloat: case at::kDouble: case at::kBFloat16: case at::kHalf:
    case at::kInt: case at::kLong: case at::kByte: case at::kChar: case at::kBool:
      break;
    default:
      ANDY_THROW(CommError, describe(op), ": unsupported dtype ", t.scalar_type(), " for ", what);
  }
  ANDY_CHECK_T(CommError, t.numel() <= std::numeric_limits<int>::max(), describe(op), ": ", what,
               " has ", t.numel(), " elements; at most 2^31-1 per collective (split the tensor)");
}

void Communicator::check_pair(const at::Tensor& input, const at::Tensor& output,
                              const char* op) const {
  check_tensor(input, op, "input");
  check_tensor(output, op, "output");
  ANDY_CHECK_T(CommError, input.scalar_type() == output.scalar_type(), describe(op),
               ": dtype mismatch: input ", input.scalar_type(), ", output ", output.scalar_type());
}

void Communicator::check_gather(const at::Tensor& output, const at::Tensor& input, int root) const {
  check_tensor(input, "gather", "input");
  ANDY_CHECK_T(CommError, root >= 0 && root < size_, describe("gather"), ": root ", root,
               " outside the group of ", size_);
  if (rank_ != root) return;
  check_pair(input, output, "gather");
  ANDY_CHECK_T(CommError, output.numel() == input.numel() * size_, describe("gather"), ": output has ",
               output.numel(), " elements, expected ", size_, " x ", input.numel());
}

void Communicator::check_reduction(const at::Tensor& t, ReduceOp reduce, const char* op) const {
  ANDY_CHECK_T(CommError, reduce != ReduceOp::kAvg || at::isFloatingType(t.scalar_type()),
               describe(op), ": avg needs a floating dtype, got ", t.scalar_type());
  ANDY_CHECK_T(CommError, t.scalar_type() != at::kBool, describe(op),
               ": bool tensors cannot be reduced; use uint8");
}

std::vector<int64_t> Communicator::resolve_counts(const std::vector<int64_t>& counts,
                                                  int64_t total, int64_t mine,
                                                  const char* op) const {
  if (counts.empty()) {
    ANDY_CHECK_T(CommError, total == mine * size_, describe(op), ": size mismatch: the ",
                 "gathered/scattered tensor has ", total, " elements, expected group size ", size_,
                 " x ", mine, " = ", mine * size_, " (pass counts for uneven shares)");
    return std::vector<int64_t>(size_, mine);
  }
  ANDY_CHECK_T(CommError, static_cast<int>(counts.size()) == size_, describe(op), ": ",
               counts.size(), " counts given for a group of ", size_);
  int64_t sum = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  for (int64_t c : counts) ANDY_CHECK_T(CommError, c >= 0, describe(op), ": negative count ", c);
  ANDY_CHECK_T(CommError, counts[rank_] == mine, describe(op), ": size mismatch: this rank has ",
               mine, " elements but counts[", rank_, "] = ", counts[rank_]);
  ANDY_CHECK_T(CommError, sum == total, describe(op), ": size mismatch: counts add up to ", sum,
               " but the full tensor has ", total, " elements");
  return counts;
}

}  // namespace andy
