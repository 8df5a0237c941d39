// Collective benchmark and correctness check (the `andyllm bench comm` engine).
// Rows compare with nccl-tests: size, count, time, algbw, busbw (all_reduce busbw = algbw x
// 2(n-1)/n; all_gather and reduce_scatter x (n-1)/n; broadcast x 1) and #wrong, the elements
// that differ from closed-form expected values. Beside each row, the same collective as the
// library's own blocking call on the same buffers (RawCollectives: "raw") and the ratio of the
// two busbw. Collective over the communicator's group.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace andy {

struct CommBenchOptions {
  int64_t min_bytes = 8;                 // Default: 8 B.
  int64_t max_bytes = 8 << 20;           // Default: 8 MiB.
  int64_t factor = 8;                    // Default: sizes grow 8x per row.
  int warmup = 2;                        // Default: 2 untimed iterations.
  int iters = 5;                         // Default: 5 timed iterations.
  at::ScalarType dtype = at::kFloat;
  std::vector<std::string> ops = {"all_reduce", "all_gather", "reduce_scatter", "broadcast"};
  at::Device device = at::kCPU;
  int debug_skip_rank = -1;  // this rank skips the first collective (shows the timeout path)
  bool raw = true;           // Default: true: also time the raw library call (RawCollectives)
};

struct CommBenchRow {
  std::string op;
  int64_t bytes = 0;   // nccl-tests "size": the full (gathered / unscattered) buffer
  int64_t count = 0;   // elements of that buffer
  double time_us = 0;  // mean over iterations, max over ranks
  double algbw_gbs = 0;
  double busbw_gbs = 0;
  int64_t wrong = 0;   // summed over ranks
  // The raw library call on the same buffers: columns shown with opts.raw, 0 where the library
  // has no such call (MPI sums of bf16/fp16).
  bool has_raw = false;
  double raw_time_us = 0;
  double raw_algbw_gbs = 0;
  double raw_busbw_gbs = 0;
  // busbw / raw busbw (as raw time / time, so that it also means something on one rank).
  double ratio() const { return time_us > 0 && raw_time_us > 0 ? raw_time_us / time_us : 0; }
};

// The library's own blocking collective for each op, beside a Communicator and on its group,
// for the raw columns: sum reductions, equal shares, fp32 or any dtype the library has.
//   mpi:  MPI_Allreduce (in place), MPI_Allgather, MPI_Reduce_scatter, MPI_Bcast on a duplicate
//         of the communicator's group;
//   nccl: ncclAllReduce, ncclAllGather, ncclReduceScatter, ncclBroadcast on the communicator's
//         NCCL comm and the caller's current stream, then cudaStreamSynchronize.
// Every call blocks until done and has no timeout: call it only after the Communicator has
// completed the same collective (the other ranks are there).
class RawCollectives {
 public:
  virtual ~RawCollectives() = default;
  virtual std::string name() const = 0;  // "raw mpi", "raw nccl"
  // Whether the library reduces this dtype (MPI has no bf16/fp16 sum); gathers always run.
  virtual bool can_reduce(at::ScalarType t) const = 0;
  virtual void all_reduce(at::Tensor& tensor) = 0;
  virtual void all_gather(at::Tensor& output, const at::Tensor& input) = 0;
  virtual void reduce_scatter(at::Tensor& output, const at::Tensor& input) = 0;
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
};

// Collective over the communicator's group (the MPI backend duplicates its communicator).
std::unique_ptr<RawCollectives> make_raw_collectives(Communicator& comm);

// Runs every op at every size; calls on_row on each rank as rows complete.
std::vector<CommBenchRow> run_comm_bench(Communicator& comm, const CommBenchOptions& opts,
                                         const std::function<void(const CommBenchRow&)>& on_row);

// nccl-tests style header and row text.
std::string comm_bench_header(const Communicator& comm, const CommBenchOptions& opts);
std::string comm_bench_format(const CommBenchRow& row, at::ScalarType dtype);

}  // namespace andy
