// Collective benchmark: closed-form inputs, timed iterations, exact checks of the results.
#include "parallel/comm_bench.h"

#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <thread>

#include "core/base/error.h"
#include "core/base/logging.h"

namespace andy {

namespace {

// Values are small integers, exact in every dtype including bf16 for groups up to 16 ranks.
at::Tensor pattern(int64_t n, int64_t offset, int64_t mod, double add, at::ScalarType dtype,
                   at::Device dev) {
  auto idx = at::arange(offset, offset + n, at::TensorOptions().dtype(at::kLong));
  return (idx.remainder(mod).to(at::kDouble) + add).to(dtype).to(dev);
}

int64_t count_wrong(const at::Tensor& got, const at::Tensor& expected) {
  return got.to(at::kCPU).to(at::kDouble).ne(expected.to(at::kCPU).to(at::kDouble)).sum().item<int64_t>();
}

// nccl-tests' type names.
const char* type_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float";
    case at::kDouble: return "double";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "half";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

double bus_factor(const std::string& op, int n) {
  if (n <= 1) return 0.0;
  if (op == "all_reduce") return 2.0 * (n - 1) / n;
  if (op == "all_gather" || op == "reduce_scatter") return static_cast<double>(n - 1) / n;
  return 1.0;
}

}  // namespace

namespace {

// One collective of one size, ready to run: its buffers, how to issue it, how to restore an
// in-place input, and the exact result every rank must see.
struct BenchCase {
  at::Tensor in, out, expected;
  std::function<WorkPtr()> issue;
  std::function<void()> reset = [] {};
  int64_t count = 0;
  at::Tensor& result(const std::string& op) { return (op == "all_reduce" || op == "broadcast") ? in : out; }
};

// Full-buffer element count of `bytes`, rounded down to a multiple of n for the sharded ops.
int64_t bench_count(const std::string& op, int64_t bytes, int64_t elem, int n) {
  int64_t count = std::max<int64_t>(1, bytes / elem);
  if (op == "all_gather" || op == "reduce_scatter") count = std::max<int64_t>(n, count / n * n);
  return count;
}

// Inputs are closed-form patterns, so the expected result is known exactly on every rank.
// The returned case refers to itself through its callbacks: keep it where it is (a unique_ptr).
std::unique_ptr<BenchCase> make_case(Communicator& comm, const std::string& op, int64_t count,
                                     const CommBenchOptions& opts) {
  const int n = comm.size(), r = comm.rank();
  const double tri = n * (n + 1) / 2.0;
  const int64_t shard = count / n;
  const auto dev = opts.device;
  const auto on_dev = at::TensorOptions().dtype(opts.dtype).device(dev);
  auto c = std::make_unique<BenchCase>();
  BenchCase& k = *c;
  k.count = count;
  if (op == "all_reduce") {
    at::Tensor fresh = pattern(count, 0, 5, r + 1, opts.dtype, dev);
    k.in = fresh.clone();
    k.reset = [&k, fresh] { k.in.copy_(fresh); };
    k.issue = [&k, &comm] { return comm.all_reduce(k.in, {ReduceOp::kSum}); };
    k.expected = pattern(count, 0, 5, 0, at::kDouble, at::kCPU) * n + tri;
  } else if (op == "all_gather") {
    k.in = pattern(shard, 0, 4, 4.0 * r, opts.dtype, dev);
    k.out = at::zeros({count}, on_dev);
    k.issue = [&k, &comm] { return comm.all_gather(k.out, k.in); };
    std::vector<at::Tensor> parts;
    for (int q = 0; q < n; ++q) parts.push_back(pattern(shard, 0, 4, 4.0 * q, at::kDouble, at::kCPU));
    k.expected = at::cat(parts);
  } else if (op == "reduce_scatter") {
    k.in = pattern(count, 0, 5, r + 1, opts.dtype, dev);
    k.out = at::zeros({shard}, on_dev);
    k.issue = [&k, &comm] { return comm.reduce_scatter(k.out, k.in, {ReduceOp::kSum, {}}); };
    k.expected = pattern(shard, r * shard, 5, 0, at::kDouble, at::kCPU) * n + tri;
  } else {
    at::Tensor fresh = r == 0 ? pattern(count, 0, 7, 1, opts.dtype, dev) : at::zeros({count}, on_dev);
    k.in = fresh.clone();
    k.reset = [&k, fresh] { k.in.copy_(fresh); };
    k.issue = [&k, &comm] { return comm.broadcast(k.in, 0); };
    k.expected = pattern(count, 0, 7, 1, at::kDouble, at::kCPU);
  }
  return c;
}

// Warm-up, a barrier, then the mean time of the timed iterations on this rank (µs).
double time_case(Communicator& comm, BenchCase& k, const CommBenchOptions& opts) {
  for (int i = 0; i < opts.warmup; ++i) {
    k.reset();
    k.issue()->wait();
  }
  comm.barrier()->wait();
  double total = 0;
  for (int i = 0; i < std::max(1, opts.iters); ++i) {
    k.reset();
    auto t0 = std::chrono::steady_clock::now();
    k.issue()->wait();
    total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  return total / std::max(1, opts.iters);
}

// The row every rank agrees on: the slowest rank's time and the wrong elements of all ranks.
CommBenchRow agreed_row(Communicator& comm, const std::string& op, int64_t count, double time_us, int64_t wrong,
                        const CommBenchOptions& opts) {
  at::Tensor t_max = at::full({1}, time_us, at::kDouble).to(opts.device);
  at::Tensor w_sum = at::full({1}, static_cast<double>(wrong), at::kDouble).to(opts.device);
  comm.all_reduce(t_max, {ReduceOp::kMax})->wait();
  comm.all_reduce(w_sum, {ReduceOp::kSum})->wait();
  CommBenchRow row;
  row.op = op;
  row.count = count;
  row.bytes = count * at::elementSize(opts.dtype);
  row.time_us = t_max.to(at::kCPU).item<double>();
  row.wrong = static_cast<int64_t>(w_sum.to(at::kCPU).item<double>());
  row.algbw_gbs = row.time_us > 0 ? row.bytes / row.time_us / 1e3 : 0;
  row.busbw_gbs = row.algbw_gbs * bus_factor(op, comm.size());
  return row;
}

}  // namespace

std::vector<CommBenchRow> run_comm_bench(Communicator& comm, const CommBenchOptions& opts,
                                         const std::function<void(const CommBenchRow&)>& on_row) {
  std::vector<CommBenchRow> rows;
  bool skipped = false;
  for (const auto& op : opts.ops) {
    ANDY_CHECK_T(ConfigError, op == "all_reduce" || op == "all_gather" || op == "reduce_scatter" ||
                                  op == "broadcast",
                 "unknown collective '", op, "'; expected all_reduce, all_gather, reduce_scatter or broadcast");
    for (int64_t bytes = opts.min_bytes; bytes <= opts.max_bytes; bytes *= std::max<int64_t>(2, opts.factor)) {
      const int64_t count = bench_count(op, bytes, at::elementSize(opts.dtype), comm.size());
      std::unique_ptr<BenchCase> k = make_case(comm, op, count, opts);
      if (comm.rank() == opts.debug_skip_rank && !skipped) {
        skipped = true;
        log::warn("--debug_skip_rank: rank ", comm.rank(), " skips ", op, " (the others must time out)");
        std::this_thread::sleep_for(comm.timeout() * 4);
        ANDY_THROW(Error, "rank ", comm.rank(), " skipped a collective on purpose and was not aborted");
      }
      const double time_us = time_case(comm, *k, opts);
      const int64_t wrong = count_wrong(k->result(op), k->expected);
      rows.push_back(agreed_row(comm, op, count, time_us, wrong, opts));
      if (on_row) on_row(rows.back());
    }
  }
  return rows;
}

std::string comm_bench_header(const Communicator& comm, const CommBenchOptions& opts) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "# andyllm bench comm: %d ranks, backend %s, dtype %s, %d warmup + %d timed iterations\n"
                "#%15s %14s %8s %10s %12s %9s %9s %8s\n"
                "#%15s %14s %8s %10s %12s %9s %9s %8s\n",
                comm.size(), backend_name(comm.backend()), type_name(opts.dtype), opts.warmup,
                opts.iters, "size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong",
                "(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)", "");
  return buf;
}

std::string comm_bench_format(const CommBenchRow& row, at::ScalarType dtype) {
  char buf[256];
  std::string redop = (row.op == "all_reduce" || row.op == "reduce_scatter") ? "sum" : "none";
  std::snprintf(buf, sizeof buf, " %15lld %14lld %8s %10s %12.1f %9.3f %9.3f %8lld  %s\n",
                static_cast<long long>(row.bytes), static_cast<long long>(row.count),
                type_name(dtype), redop.c_str(), row.time_us, row.algbw_gbs, row.busbw_gbs,
                static_cast<long long>(row.wrong), row.op.c_str());
  return buf;
}

}  // namespace andy
