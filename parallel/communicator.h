// Communicator: collectives over a group of ranks, shaped like PyTorch c10d's Backend.
// One method per collective; count and datatype come from the tensors, never by hand.
// Every method returns a Work handle; the operation is complete only after wait().
// Contract: every rank of the group must issue the same collectives in the same order with
// matching shapes. A wait() that passes its timeout throws TimeoutError naming the rank and
// the operation; the communicator is unusable afterwards and the caller must abort the job
// (launch/ does: MPI_Abort). Not thread-safe: issue collectives from one thread at a time.
//
//   auto work = comm.all_reduce(grad, {ReduceOp::kAvg});
//   ... overlap compute ...
//   work->wait();
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace andy {

enum class ReduceOp { kSum, kAvg, kMax, kMin };
const char* reduce_op_name(ReduceOp op);

enum class Backend { kMpi, kNccl };
const char* backend_name(Backend b);

// Handle to an issued collective.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until complete. timeout <= 0 means the communicator's default timeout.
  // Throws TimeoutError (job must abort) or CommError.
  virtual void wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) = 0;
  // Non-blocking completion check; runs the completion hooks when done (on the MPI backend's
  // nonblocking fallback it also drives MPI's progress).
  virtual bool is_completed() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
};

// counts: elements each rank contributes (all_gather) or receives (reduce_scatter).
// Empty: equal shares (the output's, resp. input's, numel must be world x the other's).
struct AllGatherOptions {
  std::vector<int64_t> counts;
};
struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::kSum;
  std::vector<int64_t> counts;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Rank in MPI_COMM_WORLD, for messages.
  int global_rank() const { return global_rank_; }
  // "world", "tp[dp=1]", ... used in messages.
  const std::string& name() const { return name_; }
  virtual Backend backend() const = 0;
  // Default: 300 s (parallel.collective_timeout_s).
  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

  // In place over the group. kAvg needs a floating dtype.
  virtual WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {}) = 0;
  // output (contiguous, 1-D view of all ranks' inputs concatenated in rank order).
  virtual WorkPtr all_gather(at::Tensor& output, const at::Tensor& input,
                             const AllGatherOptions& opts = {}) = 0;
  // Reduces `input` over the group, rank r receives slice r into `output`.
  virtual WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                 const ReduceScatterOptions& opts = {}) = 0;
  virtual WorkPtr broadcast(at::Tensor& tensor, int root) = 0;
  // Every rank's input (the same numel everywhere) concatenated in rank order into `output` on
  // `root` (contiguous, size() * input.numel() elements); `output` is not read elsewhere.
  virtual WorkPtr gather(at::Tensor& output, const at::Tensor& input, int root) = 0;
  virtual WorkPtr barrier() = 0;

  // Synchronous forms (issue + wait).
  void all_reduce_sync(at::Tensor& t, ReduceOp op = ReduceOp::kSum) { all_reduce(t, {op})->wait(); }
  void broadcast_sync(at::Tensor& t, int root) { broadcast(t, root)->wait(); }
  void barrier_sync() { barrier()->wait(); }

 protected:
  Communicator(int rank, int size, int global_rank, std::string name,
               std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), global_rank_(global_rank), name_(std::move(name)), timeout_(timeout) {}

  // gather's: the input, the root inside the group, and on the root an output of the input's
  // dtype with size() times its elements.
  void check_gather(const at::Tensor& output, const at::Tensor& input, int root) const;
  // Shared argument checks: contiguity, dtype support, size agreement. Throw CommError.
  void check_tensor(const at::Tensor& t, const char* op, const char* what) const;
  // check_tensor on both, and the same dtype.
  void check_pair(const at::Tensor& input, const at::Tensor& output, const char* op) const;
  // The reduction is defined for the dtype: avg needs a floating type, bool never reduces.
  void check_reduction(const at::Tensor& t, ReduceOp reduce, const char* op) const;
  // Returns per-rank counts for all_gather/reduce_scatter and checks them against the sizes.
  std::vector<int64_t> resolve_counts(const std::vector<int64_t>& counts, int64_t total,
                                      int64_t mine, const char* op) const;
  std::string describe(const char* op) const;  // "all_reduce on world (rank 1 of 4)"

  int rank_;
  int size_;
  int global_rank_;
  std::string name_;
  std::chrono::milliseconds timeout_;
};

using CommPtr = std::shared_ptr<Communicator>;

}  // namespace andy
