// MPI backend of the Communicator: nonblocking MPI collectives polled to completion with a
// deadline. Completion hooks (copy back from fp32 staging, divide for avg) run exactly once,
// in the first wait()/is_completed() that sees the request done.
#include "parallel/mpi_communicator.h"

#include <sched.h>

#include <deque>
#include <thread>

#include "core/base/logging.h"

namespace andy {

namespace {

// Datatype that moves the tensor's elements bit for bit.
MPI_Datatype copy_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kBFloat16: case at::kHalf: return MPI_UINT16_T;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte: case at::kBool: return MPI_UINT8_T;
    case at::kChar: return MPI_INT8_T;
    default: return MPI_DATATYPE_NULL;
  }
}

bool is_narrow_float(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: case ReduceOp::kAvg: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

// How wait() polls an unfinished collective: the first polls back to back, then yielding the
// core between polls, then sleeping (short, then long) so that ranks sharing cores progress.
constexpr int kSpinPolls = 64, kYieldPolls = 1024, kShortSleepPolls = 4096;
constexpr std::chrono::microseconds kShortSleep{50}, kLongSleep{500};

class MpiWork : public Work {
 public:
  MpiWork(std::string what, std::chrono::milliseconds default_timeout)
      : what_(std::move(what)), default_timeout_(default_timeout) {}

  MPI_Request* request() { return &request_; }
  void on_complete(std::function<void()> f) { on_complete_ = std::move(f); }
  void keep(at::Tensor t) { keep_alive_.push_back(std::move(t)); }
  std::vector<int>& ints(size_t n) {
    int_buffers_.emplace_back(n, 0);
    return int_buffers_.back();
  }
  void mark_trivially_complete() {
    request_ = MPI_REQUEST_NULL;
  }

  bool is_completed() override {
    if (done_) return true;
    int flag = 0;
    MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    if (flag) finish();
    return done_;
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (timeout.count() <= 0) timeout = default_timeout_;
    auto start = std::chrono::steady_clock::now();
    auto deadline = start + timeout;
    int spins = 0;
    while (!is_completed()) {
      auto now = std::chrono::steady_clock::now();
      if (now >= deadline) {
        double secs = std::chrono::duration<double>(now - start).count();
        throw TimeoutError(where(__FILE__, __LINE__) + "collective " + what_ +
                           " did not complete within " + std::to_string(secs).substr(0, 5) +
                           " s (parallel.collective_timeout_s): another rank skipped it, died or "
                           "is stuck; aborting the job");
      }
      // Spin briefly (latency), then yield, then sleep: oversubscribed ranks share cores.
      if (++spins < kSpinPolls) continue;
      if (spins < kYieldPolls) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(spins < kShortSleepPolls ? kShortSleep : kLongSleep);
      }
    }
  }

 private:
  void finish() {
    done_ = true;
    if (on_complete_) on_complete_();
    on_complete_ = nullptr;
    keep_alive_.clear();
  }

  std::string what_;
  std::chrono::milliseconds default_timeout_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  bool done_ = false;
  std::function<void()> on_complete_;
  std::vector<at::Tensor> keep_alive_;
  std::deque<std::vector<int>> int_buffers_;  // deque: references stay valid
};

void displacements(const std::vector<int64_t>& counts, std::vector<int>& c, std::vector<int>& d) {
  int64_t off = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    c[i] = static_cast<int>(counts[i]);
    d[i] = static_cast<int>(off);
    off += counts[i];
  }
  ANDY_CHECK_T(CommError, off <= std::numeric_limits<int>::max(), "collective of ", off,
               " elements exceeds 2^31-1");
}

}  // namespace

MpiCommunicator::MpiCommunicator(const MpiComm& group, std::string name,
                                 std::chrono::milliseconds timeout)
    : Communicator(group.rank(), group.size(), current_rank() < 0 ? 0 : current_rank(),
                   std::move(name), timeout),
      comm_(group.dup()) {
  MPI_CHECK(MPI_Comm_set_errhandler(comm_.get(), MPI_ERRORS_RETURN));
}

void MpiCommunicator::check_cpu(const at::Tensor& t, const char* op) const {
  ANDY_CHECK_T(CommError, t.device().is_cpu(), describe(op),
               ": the MPI backend takes CPU tensors, got ", t.device());
}

WorkPtr MpiCommunicator::all_reduce(at::Tensor& tensor, const AllReduceOptions& opts) {
  check_tensor(tensor, "all_reduce", "input");
  check_cpu(tensor, "all_reduce");
  check_reduction(tensor, opts.op, "all_reduce");
  auto work = std::make_shared<MpiWork>(describe("all_reduce"), timeout_);
  if (tensor.numel() == 0) {
    work->mark_trivially_complete();
    return work;
  }
  at::Tensor buf = is_narrow_float(tensor.scalar_type()) ? tensor.to(at::kFloat) : tensor;
  MPI_Datatype dt = copy_type(buf.scalar_type());
  MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf.data_ptr(), static_cast<int>(buf.numel()), dt,
                           mpi_op(opts.op), comm_.get(), work->request()));
  work->keep(buf);
  at::Tensor target = tensor;
  int n = size_;
  ReduceOp op = opts.op;
  work->on_complete([buf, target, n, op]() mutable {
    if (op == ReduceOp::kAvg) buf.div_(n);
    if (!buf.is_same(target)) target.copy_(buf);
  });
  return work;
}

WorkPtr MpiCommunicator::all_gather(at::Tensor& output, const at::Tensor& input,
                                    const AllGatherOptions& opts) {
  check_pair(input, output, "all_gather");
  check_cpu(input, "all_gather");
  check_cpu(output, "all_gather");
  auto counts = resolve_counts(opts.counts, output.numel(), input.numel(), "all_gather");
  auto work = std::make_shared<MpiWork>(describe("all_gather"), timeout_);
  auto& c = work->ints(size_);
  auto& d = work->ints(size_);
  displacements(counts, c, d);
  MPI_Datatype dt = copy_type(input.scalar_type());
  MPI_CHECK(MPI_Iallgatherv(input.numel() ? input.data_ptr() : nullptr,
                            static_cast<int>(input.numel()), dt, output.data_ptr(), c.data(),
                            d.data(), dt, comm_.get(), work->request()));
  work->keep(input);
  work->keep(output);
  return work;
}

WorkPtr MpiCommunicator::reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                        const ReduceScatterOptions& opts) {
  check_pair(input, output, "reduce_scatter");
  check_cpu(input, "reduce_scatter");
  check_cpu(output, "reduce_scatter");
  check_reduction(input, opts.op, "reduce_scatter");
  auto counts = resolve_counts(opts.counts, input.numel(), output.numel(), "reduce_scatter");
  auto work = std::make_shared<MpiWork>(describe("reduce_scatter"), timeout_);
  auto& c = work->ints(size_);
  auto& d = work->ints(size_);
  displacements(counts, c, d);
  bool narrow = is_narrow_float(input.scalar_type());
  at::Tensor in = narrow ? input.to(at::kFloat) : input;
  at::Tensor out = narrow ? at::empty({output.numel()}, output.options().dtype(at::kFloat)) : output;
  MPI_Datatype dt = copy_type(in.scalar_type());
  // MPI_Ireduce_scatter rejects a null buffer even for zero elements: give it a dummy.
  static float dummy = 0;
  void* in_ptr = in.numel() ? in.data_ptr() : &dummy;
  void* out_ptr = out.numel() ? out.data_ptr() : &dummy;
  MPI_CHECK(MPI_Ireduce_scatter(in_ptr, out_ptr, c.data(), dt, mpi_op(opts.op), comm_.get(),
                                work->request()));
  work->keep(in);
  work->keep(out);
  at::Tensor target = output;
  int n = size_;
  ReduceOp op = opts.op;
  work->on_complete([out, target, n, op]() mutable {
    if (op == ReduceOp::kAvg) out.div_(n);
    if (!out.is_same(target)) target.view({-1}).copy_(out);
  });
  return work;
}

WorkPtr MpiCommunicator::broadcast(at::Tensor& tensor, int root) {
  check_tensor(tensor, "broadcast", "input");
  check_cpu(tensor, "broadcast");
  ANDY_CHECK_T(CommError, root >= 0 && root < size_, describe("broadcast"), ": root ", root,
               " outside the group of ", size_);
  auto work = std::make_shared<MpiWork>(describe("broadcast"), timeout_);
  if (tensor.numel() == 0) {
    work->mark_trivially_complete();
    return work;
  }
  MPI_CHECK(MPI_Ibcast(tensor.data_ptr(), static_cast<int>(tensor.numel()),
                       copy_type(tensor.scalar_type()), root, comm_.get(), work->request()));
  work->keep(tensor);
  return work;
}

WorkPtr MpiCommunicator::barrier() {
  auto work = std::make_shared<MpiWork>(describe("barrier"), timeout_);
  MPI_CHECK(MPI_Ibarrier(comm_.get(), work->request()));
  return work;
}

}  // namespace andy
