// Collective benchmark and correctness check (the `andyllm bench comm` engine).
// Rows compare with nccl-tests: size, count, time, algbw, busbw (all_reduce busbw = algbw x
// 2(n-1)/n; all_gather and reduce_scatter x (n-1)/n; broadcast x 1) and #wrong, the elements
// that differ from closed-form expected values. Collective over the communicator's group.
#pragma once

#include <functional>
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
};

struct CommBenchRow {
  std::string op;
  int64_t bytes = 0;   // nccl-tests "size": the full (gathered / unscattered) buffer
  int64_t count = 0;   // elements of that buffer
  double time_us = 0;  // mean over iterations, max over ranks
  double algbw_gbs = 0;
  double busbw_gbs = 0;
  int64_t wrong = 0;   // summed over ranks
};

// Runs every op at every size; calls on_row on each rank as rows complete.
std::vector<CommBenchRow> run_comm_bench(Communicator& comm, const CommBenchOptions& opts,
                                         const std::function<void(const CommBenchRow&)>& on_row);

// nccl-tests style header and row text.
std::string comm_bench_header(const Communicator& comm, const CommBenchOptions& opts);
std::string comm_bench_format(const CommBenchRow& row, at::ScalarType dtype);

}  // namespace andy
