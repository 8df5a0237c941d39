// Collective benchmark: closed-form inputs, timed iterations, exact checks of the results, and
// the same collective as the raw library call, timed in alternation on the same buffers.
#include "parallel/comm_bench.h"

#include <algorithm>
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

// One collective of one size, ready to run: its buffers, how to issue it (and to run it as the
// raw library call, when there is one), how to restore an in-place input, and the exact result
// every rank must see.
struct BenchCase {
  at::Tensor in, out, expected;
  std::function<WorkPtr()> issue;
  std::function<void()> raw;  // empty: no raw column
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
std::unique_ptr<BenchCase> make_case(Communicator& comm, RawCollectives* raw, const std::string& op,
                                     int64_t count, const CommBenchOptions& opts) {
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
    if (raw && raw->can_reduce(opts.dtype)) k.raw = [&k, raw] { raw->all_reduce(k.in); };
    k.expected = pattern(count, 0, 5, 0, at::kDouble, at::kCPU) * n + tri;
  } else if (op == "all_gather") {
    k.in = pattern(shard, 0, 4, 4.0 * r, opts.dtype, dev);
    k.out = at::zeros({count}, on_dev);
    k.issue = [&k, &comm] { return comm.all_gather(k.out, k.in); };
    if (raw) k.raw = [&k, raw] { raw->all_gather(k.out, k.in); };
    std::vector<at::Tensor> parts;
    for (int q = 0; q < n; ++q) parts.push_back(pattern(shard, 0, 4, 4.0 * q, at::kDouble, at::kCPU));
    k.expected = at::cat(parts);
  } else if (op == "reduce_scatter") {
    k.in = pattern(count, 0, 5, r + 1, opts.dtype, dev);
    k.out = at::zeros({shard}, on_dev);
    k.issue = [&k, &comm] { return comm.reduce_scatter(k.out, k.in, {ReduceOp::kSum, {}}); };
    if (raw && raw->can_reduce(opts.dtype)) k.raw = [&k, raw] { raw->reduce_scatter(k.out, k.in); };
    k.expected = pattern(shard, r * shard, 5, 0, at::kDouble, at::kCPU) * n + tri;
  } else {
    at::Tensor fresh = r == 0 ? pattern(count, 0, 7, 1, opts.dtype, dev) : at::zeros({count}, on_dev);
    k.in = fresh.clone();
    k.reset = [&k, fresh] { k.in.copy_(fresh); };
    k.issue = [&k, &comm] { return comm.broadcast(k.in, 0); };
    if (raw) k.raw = [&k, raw] { raw->broadcast(k.in, 0); };
    k.expected = pattern(count, 0, 7, 1, at::kDouble, at::kCPU);
  }
  return c;
}

// Mean times on this rank (µs) of the Communicator's collective and of the raw call.
struct CaseTimes {
  double ours_us = 0;
  double raw_us = 0;
};

double micros_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

// Warm-up, a barrier, then the timed iterations: each runs the Communicator's collective, then
// the raw call on the same buffers, so drifts of a noisy machine hit both columns alike. The
// Communicator goes first every time: a rank that skips it times out there (the raw call has no
// timeout), and its result is checked before the raw call overwrites it (`wrong`).
CaseTimes time_case(Communicator& comm, BenchCase& k, const std::string& op, const CommBenchOptions& opts,
                    int64_t* wrong) {
  for (int i = 0; i < opts.warmup; ++i) {
    k.reset();
    k.issue()->wait();
    if (k.raw) {
      k.reset();
      k.raw();
    }
  }
  comm.barrier()->wait();
  CaseTimes t;
  const int iters = std::max(1, opts.iters);
  for (int i = 0; i < iters; ++i) {
    k.reset();
    auto t0 = std::chrono::steady_clock::now();
    k.issue()->wait();
    t.ours_us += micros_since(t0);
    if (i == iters - 1) *wrong = count_wrong(k.result(op), k.expected);
    if (k.raw) {
      k.reset();
      t0 = std::chrono::steady_clock::now();
      k.raw();
      t.raw_us += micros_since(t0);
    }
  }
  t.ours_us /= iters;
  t.raw_us /= iters;
  return t;
}

// The row every rank agrees on: the slowest rank's times and the wrong elements of all ranks.
CommBenchRow agreed_row(Communicator& comm, const std::string& op, int64_t count, const CaseTimes& times,
                        int64_t wrong, const CommBenchOptions& opts) {
  at::Tensor t_max = at::tensor({times.ours_us, times.raw_us}, at::kDouble).to(opts.device);
  at::Tensor w_sum = at::full({1}, static_cast<double>(wrong), at::kDouble).to(opts.device);
  comm.all_reduce(t_max, {ReduceOp::kMax})->wait();
  comm.all_reduce(w_sum, {ReduceOp::kSum})->wait();
  t_max = t_max.to(at::kCPU);
  CommBenchRow row;
  row.op = op;
  row.count = count;
  row.bytes = count * at::elementSize(opts.dtype);
  row.time_us = t_max[0].item<double>();
  row.has_raw = opts.raw;
  row.raw_time_us = t_max[1].item<double>();
  row.wrong = static_cast<int64_t>(w_sum.to(at::kCPU).item<double>());
  const double factor = bus_factor(op, comm.size());
  row.algbw_gbs = row.time_us > 0 ? row.bytes / row.time_us / 1e3 : 0;
  row.busbw_gbs = row.algbw_gbs * factor;
  row.raw_algbw_gbs = row.raw_time_us > 0 ? row.bytes / row.raw_time_us / 1e3 : 0;
  row.raw_busbw_gbs = row.raw_algbw_gbs * factor;
  return row;
}

}  // namespace

std::vector<CommBenchRow> run_comm_bench(Communicator& comm, const CommBenchOptions& opts,
                                         const std::function<void(const CommBenchRow&)>& on_row) {
  std::vector<CommBenchRow> rows;
  bool skipped = false;
  std::unique_ptr<RawCollectives> raw = opts.raw ? make_raw_collectives(comm) : nullptr;
  for (const auto& op : opts.ops) {
    ANDY_CHECK_T(ConfigError, op == "all_reduce" || op == "all_gather" || op == "reduce_scatter" ||
                                  op == "broadcast",
                 "unknown collective '", op, "'; expected all_reduce, all_gather, reduce_scatter or broadcast");
    for (int64_t bytes = opts.min_bytes; bytes <= opts.max_bytes; bytes *= std::max<int64_t>(2, opts.factor)) {
      const int64_t count = bench_count(op, bytes, at::elementSize(opts.dtype), comm.size());
      std::unique_ptr<BenchCase> k = make_case(comm, raw.get(), op, count, opts);
      if (comm.rank() == opts.debug_skip_rank && !skipped) {
        skipped = true;
        log::warn("--debug_skip_rank: rank ", comm.rank(), " skips ", op, " (the others must time out)");
        std::this_thread::sleep_for(comm.timeout() * 4);
        ANDY_THROW(Error, "rank ", comm.rank(), " skipped a collective on purpose and was not aborted");
      }
      int64_t wrong = 0;
      const CaseTimes times = time_case(comm, *k, op, opts, &wrong);
      rows.push_back(agreed_row(comm, op, count, times, wrong, opts));
      if (on_row) on_row(rows.back());
    }
  }
  return rows;
}

std::string comm_bench_header(const Communicator& comm, const CommBenchOptions& opts) {
  // Group labels centred over their columns: time, algbw, busbw, #wrong (41) | time .. ratio (40).
  auto centred = [](const std::string& label, size_t width) {
    size_t left = (width - std::min(width, label.size())) / 2;
    return std::string(left, ' ') + label + std::string(width - left - std::min(width, label.size()), ' ');
  };
  const std::string raw = comm.backend() == Backend::kMpi ? "raw mpi" : "raw nccl";
  char buf[1024];
  std::snprintf(buf, sizeof buf,
                "# andyllm bench comm: %d ranks, backend %s, group %s, dtype %s, %d warmup + %d timed iterations%s\n"
                "#%15s %14s %8s %10s %s%s\n"
                "#%15s %14s %8s %10s %12s %9s %9s %8s%s\n"
                "#%15s %14s %8s %10s %12s %9s %9s %8s%s\n",
                comm.size(), backend_name(comm.backend()), comm.name().c_str(), type_name(opts.dtype), opts.warmup,
                opts.iters,
                opts.raw ? "\n# raw: the library's own blocking call on the same buffers; ratio: busbw / raw busbw" : "",
                "", "", "", "", centred("andyllm", 41).c_str(), opts.raw ? (" " + centred(raw, 40)).c_str() : "",
                "size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong",
                opts.raw ? "         time     algbw     busbw   ratio" : "", "(B)", "(elements)", "", "",
                "(us)", "(GB/s)", "(GB/s)", "", opts.raw ? "         (us)    (GB/s)    (GB/s)        " : "");
  return buf;
}

std::string comm_bench_format(const CommBenchRow& row, at::ScalarType dtype) {
  char buf[384];
  std::string redop = (row.op == "all_reduce" || row.op == "reduce_scatter") ? "sum" : "none";
  char raw[128] = "";
  if (row.has_raw && row.raw_time_us > 0) {
    std::snprintf(raw, sizeof raw, " %12.1f %9.3f %9.3f %7.2f", row.raw_time_us, row.raw_algbw_gbs,
                  row.raw_busbw_gbs, row.ratio());
  } else if (row.has_raw) {
    std::snprintf(raw, sizeof raw, " %12s %9s %9s %7s", "-", "-", "-", "-");
  }
  std::snprintf(buf, sizeof buf, " %15lld %14lld %8s %10s %12.1f %9.3f %9.3f %8lld%s  %s\n",
                static_cast<long long>(row.bytes), static_cast<long long>(row.count),
                type_name(dtype), redop.c_str(), row.time_us, row.algbw_gbs, row.busbw_gbs,
                static_cast<long long>(row.wrong), raw, row.op.c_str());
  return buf;
}

}  // namespace andy
