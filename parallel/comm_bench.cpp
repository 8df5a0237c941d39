// Collective benchmark: closed-form inputs, timed iterations, exact checks of the results.
#include "parallel/comm_bench.h"

#include <chrono>
#include <cstdio>
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

std::vector<CommBenchRow> run_comm_bench(Communicator& comm, const CommBenchOptions& opts,
                                         const std::function<void(const CommBenchRow&)>& on_row) {
  const int n = comm.size(), r = comm.rank();
  const int64_t elem = at::elementSize(opts.dtype);
  const double tri = n * (n + 1) / 2.0;
  auto dev = opts.device;
  std::vector<CommBenchRow> rows;
  bool skipped = false;
  for (const auto& op : opts.ops) {
    ANDY_CHECK_T(ConfigError, op == "all_reduce" || op == "all_gather" || op == "reduce_scatter" ||
                                  op == "broadcast",
                 "unknown collective '", op, "'; expected all_reduce, all_gather, reduce_scatter or broadcast");
    for (int64_t bytes = opts.min_bytes; bytes <= opts.max_bytes; bytes *= std::max<int64_t>(2, opts.factor)) {
      // Full-buffer element count, rounded down to a multiple of n for the sharded ops.
      int64_t count = std::max<int64_t>(1, bytes / elem);
      if (op == "all_gather" || op == "reduce_scatter") count = std::max<int64_t>(n, count / n * n);
      int64_t shard = count / n;
      at::Tensor in, out, expected;
      std::function<WorkPtr()> issue;
      std::function<void()> reset = [] {};  // restores the input of in-place ops
      if (op == "all_reduce") {
        at::Tensor fresh = pattern(count, 0, 5, r + 1, opts.dtype, dev);
        in = fresh.clone();
        reset = [&, fresh] { in.copy_(fresh); };
        issue = [&] { return comm.all_reduce(in, {ReduceOp::kSum}); };
        expected = pattern(count, 0, 5, 0, at::kDouble, at::kCPU) * n + tri;
      } else if (op == "all_gather") {
        in = pattern(shard, 0, 4, 4.0 * r, opts.dtype, dev);
        out = at::zeros({count}, at::TensorOptions().dtype(opts.dtype).device(dev));
        issue = [&] { return comm.all_gather(out, in); };
        std::vector<at::Tensor> parts;
        for (int q = 0; q < n; ++q) parts.push_back(pattern(shard, 0, 4, 4.0 * q, at::kDouble, at::kCPU));
        expected = at::cat(parts);
      } else if (op == "reduce_scatter") {
        in = pattern(count, 0, 5, r + 1, opts.dtype, dev);
        out = at::zeros({shard}, at::TensorOptions().dtype(opts.dtype).device(dev));
        issue = [&] { return comm.reduce_scatter(out, in, {ReduceOp::kSum, {}}); };
        expected = pattern(shard, r * shard, 5, 0, at::kDouble, at::kCPU) * n + tri;
      } else {
        at::Tensor fresh = r == 0 ? pattern(count, 0, 7, 1, opts.dtype, dev)
                                  : at::zeros({count}, at::TensorOptions().dtype(opts.dtype).device(dev));
        in = fresh.clone();
        reset = [&, fresh] { in.copy_(fresh); };
        issue = [&] { return comm.broadcast(in, 0); };
        expected = pattern(count, 0, 7, 1, at::kDouble, at::kCPU);
      }
      if (r == opts.debug_skip_rank && !skipped) {
        skipped = true;
        log::warn("--debug_skip_rank: rank ", r, " skips ", op, " (the others must time out)");
        std::this_thread::sleep_for(comm.timeout() * 4);
        ANDY_THROW(Error, "rank ", r, " skipped a collective on purpose and was not aborted");
      }
      for (int i = 0; i < opts.warmup; ++i) {
        reset();
        issue()->wait();
      }
      comm.barrier()->wait();
      double total = 0;
      for (int i = 0; i < std::max(1, opts.iters); ++i) {
        reset();
        auto t0 = std::chrono::steady_clock::now();
        issue()->wait();
        total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      }
      at::Tensor result = (op == "all_reduce" || op == "broadcast") ? in : out;
      int64_t wrong = count_wrong(result, expected);
      at::Tensor stats = at::tensor({total / std::max(1, opts.iters), static_cast<double>(wrong)},
                                    at::TensorOptions().dtype(at::kDouble));
      at::Tensor t_max = stats.narrow(0, 0, 1).clone().to(dev);
      at::Tensor w_sum = stats.narrow(0, 1, 1).clone().to(dev);
      comm.all_reduce(t_max, {ReduceOp::kMax})->wait();
      comm.all_reduce(w_sum, {ReduceOp::kSum})->wait();
      CommBenchRow row;
      row.op = op;
      row.count = count;
      row.bytes = count * elem;
      row.time_us = t_max.to(at::kCPU).item<double>();
      row.wrong = static_cast<int64_t>(w_sum.to(at::kCPU).item<double>());
      row.algbw_gbs = row.time_us > 0 ? row.bytes / row.time_us / 1e3 : 0;
      row.busbw_gbs = row.algbw_gbs * bus_factor(op, n);
      rows.push_back(row);
      if (on_row) on_row(row);
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
