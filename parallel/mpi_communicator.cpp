// MPI backend of the Communicator. Each collective is described once in two forms (MpiCall):
// the blocking call, run in issue order by the communicator's CollectiveThread, and the
// nonblocking call that wait() polls where MPI lacks MPI_THREAD_MULTIPLE. The two never mix on
// one communicator (a blocking collective does not match a nonblocking one, and Open MPI 4.1's
// libnbc, progressed from the caller while the thread is inside a blocking collective, crashed
// in mca_pml_ob1_isend under test_collectives -np 3). Completion hooks (copy back from fp32
// staging, divide for avg) run exactly once, on the caller's thread, in the first
// wait()/is_completed() that sees the collective done.
#include "parallel/mpi_communicator.h"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <thread>

#include "core/base/logging.h"
#include "parallel/shm_collectives.h"

namespace andy {

MPI_Datatype mpi_copy_type(at::ScalarType t) {
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

class MpiWork;

namespace {


bool is_narrow_float(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: case ReduceOp::kAvg: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

// How wait() polls an unfinished nonblocking collective (the fallback; poll_backoff): the first
// polls back to back, then yielding the core between polls, then sleeping (short, then long) so
// that ranks sharing cores progress.
constexpr int kSpinPolls = 64, kYieldPolls = 1024, kShortSleepPolls = 4096;

[[noreturn]] void throw_collective_timeout(const std::string& what, std::chrono::steady_clock::time_point start) {
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  throw TimeoutError(where(__FILE__, __LINE__) + "collective " + what + " did not complete within " +
                     std::to_string(secs).substr(0, 5) +
                     " s (parallel.collective_timeout_s): another rank skipped it, died or is stuck; aborting the job");
}

// One collective in both forms, each returning an MPI error code. The buffers they name are
// kept alive by the Work until it completes.
struct MpiCall {
  const char* name;                                   // "MPI_Allreduce", for messages
  std::function<int(MPI_Comm)> blocking;              // on the communication thread
  std::function<int(MPI_Comm, MPI_Request*)> start;   // without the thread: polled by wait()
};

}  // namespace

// The FIFO between the issuing thread and the communication thread, and the completion state
// of its Works; one mutex guards all of it.
struct CollectiveQueue {
  struct Item {
    std::shared_ptr<MpiWork> work;
    MpiCall call;
  };
  std::mutex mu;
  std::condition_variable posted;    // the thread sleeps here while the FIFO is empty
  std::condition_variable finished;  // waiters sleep here until their collective has run
  std::deque<Item> items;
  bool running = false;  // the thread is inside an MPI call on the communicator
  bool stop = false;     // the thread ends once the FIFO is empty
  bool stuck = false;    // a wait() timed out: the running call may never return
};

// Handle of one collective. Posted to the communication thread: it sets ran_/error_ under the
// queue's mutex once it has run the blocking call. Without the thread: request_ is tested with
// MPI_Test.
class MpiWork : public Work {
 public:
  MpiWork(std::string what, std::chrono::milliseconds default_timeout)
      : what_(std::move(what)), default_timeout_(default_timeout) {}

  const std::string& what() const { return what_; }
  MPI_Request* request() { return &request_; }
  void on_complete(std::function<void()> f) { on_complete_ = std::move(f); }
  void keep(at::Tensor t) { keep_alive_.push_back(std::move(t)); }
  std::vector<int>& ints(size_t n) {
    int_buffers_.emplace_back(n, 0);
    return int_buffers_.back();
  }
  void mark_trivially_complete() { request_ = MPI_REQUEST_NULL; }
  // Completion comes from the communication thread of `queue`, not from a request.
  void attach(std::shared_ptr<CollectiveQueue> queue) { queue_ = std::move(queue); }
  // Holding queue_->mu: the blocking call returned ("" or its error).
  void set_ran(std::string error) {
    ran_ = true;
    error_ = std::move(error);
  }

  bool is_completed() override {
    if (done_) return true;
    if (queue_) {
      std::unique_lock<std::mutex> lock(queue_->mu);
      if (!ran_) return false;
    } else {
      int flag = 0;
      MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
      if (!flag) return false;
    }
    finish();
    return true;
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (timeout.count() <= 0) timeout = default_timeout_;
    auto start = std::chrono::steady_clock::now();
    if (queue_ && !done_) {
      std::unique_lock<std::mutex> lock(queue_->mu);
      if (!queue_->finished.wait_until(lock, start + timeout, [this] { return ran_; })) {
        queue_->stuck = true;
        lock.unlock();
        throw_timeout(start);
      }
      lock.unlock();
      finish();
      return;
    }
    int spins = 0;
    while (!is_completed()) {
      if (std::chrono::steady_clock::now() >= start + timeout) throw_timeout(start);
      poll_backoff(++spins, kSpinPolls, kYieldPolls, kShortSleepPolls);
    }
  }

 private:
  [[noreturn]] void throw_timeout(std::chrono::steady_clock::time_point start) const {
    throw_collective_timeout(what_, start);
  }

  // Runs the hooks once. A failed blocking call throws its error here, on every wait.
  void finish() {
    if (!error_.empty()) throw CommError(error_);
    done_ = true;
    if (on_complete_) on_complete_();
    on_complete_ = nullptr;
    keep_alive_.clear();
  }

  std::string what_;
  std::chrono::milliseconds default_timeout_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  std::shared_ptr<CollectiveQueue> queue_;
  bool ran_ = false;   // guarded by queue_->mu
  std::string error_;  // guarded by queue_->mu until ran_
  bool done_ = false;  // hooks have run (caller's thread only)
  std::function<void()> on_complete_;
  std::vector<at::Tensor> keep_alive_;
  std::deque<std::vector<int>> int_buffers_;  // deque: references stay valid
};

// Handle of a collective through shared memory: complete once every rank has posted it and
// this rank has computed its result (on the caller's thread, in wait() or is_completed()).
// on_complete (copying back from an fp32 staging buffer) runs once, then.
class ShmWork : public Work {
 public:
  ShmWork(std::string what, std::chrono::milliseconds default_timeout, std::shared_ptr<ShmCollectives> shm,
          uint64_t seq, std::function<void()> on_complete)
      : what_(std::move(what)), default_timeout_(default_timeout), shm_(std::move(shm)), seq_(seq),
        on_complete_(std::move(on_complete)) {}

  bool is_completed() override {
    if (done_) return true;
    if (!shm_->try_complete(seq_)) return false;
    finish();
    return true;
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (done_) return;
    if (timeout.count() <= 0) timeout = default_timeout_;
    const auto start = std::chrono::steady_clock::now();
    if (!shm_->complete(seq_, start + timeout)) throw_collective_timeout(what_, start);
    finish();
  }

 private:
  void finish() {
    done_ = true;
    if (on_complete_) on_complete_();
    on_complete_ = nullptr;
  }

  std::string what_;
  std::chrono::milliseconds default_timeout_;
  std::shared_ptr<ShmCollectives> shm_;
  uint64_t seq_;
  std::function<void()> on_complete_;
  bool done_ = false;
};

constexpr int64_t kShmDirectAllReduceBytes = int64_t{1} << 20;  // above: direct (polled communicators)
// Above: direct, run by the thread (threaded communicators); from a slot up to this, Open MPI's
// blocking call on the thread. The direct reads are at parity with it at 4 MB and ahead from 8 MB
// (bench comm), and tiny's gradient buckets (1 and 4 MB) waited 1.7-4.1 % of the step through
// them against 0.3-0.6 % through Open MPI (docs/PERFORMANCE.md).
constexpr int64_t kShmDirectThreadedAllReduceBytes = int64_t{4} << 20;

// dst[0, n) = every rank's n floats at byte `offset` of its buffer of a direct operation,
// reduced in rank order (the slots' order, so every path gives the same bits), read in pieces
// that stay in cache.
void reduce_direct(const ShmCollectives::Reader& read, int size, int64_t offset, float* dst, int64_t n, ReduceOp op) {
  constexpr int64_t kPiece = 32 << 10;  // floats: 128 KB from each rank
  const int64_t piece = std::min(n, kPiece);
  std::vector<float> tmp(static_cast<size_t>(size * piece));
  std::vector<const float*> in(static_cast<size_t>(size));
  for (int64_t i = 0; i < n; i += kPiece) {
    const int64_t m = std::min(kPiece, n - i);
    for (int r = 0; r < size; ++r) {
      float* t = tmp.data() + r * piece;
      read(r, offset + i * static_cast<int64_t>(sizeof(float)), t, m * static_cast<int64_t>(sizeof(float)));
      in[r] = t;
    }
    ShmCollectives::reduce(dst + i, in, m, op);
  }
}

// Where rank r's part of n elements starts when they are split evenly over `size` ranks (in
// whole cache lines of floats).
int64_t even_split(int64_t n, int size, int r) {
  if (r >= size) return n;
  return std::min(n, (n * r / size + 15) / 16 * 16);
}

// The communication thread of one MpiCommunicator: runs the posted blocking collectives one
// after the other, in posting order, and wakes the waiters. It sleeps on a condition variable
// while the FIFO is empty, so it takes no core between collectives.
class CollectiveThread {
 public:
  explicit CollectiveThread(MPI_Comm comm) : queue_(std::make_shared<CollectiveQueue>()) {
    thread_ = std::thread([queue = queue_, comm] { run(*queue, comm); });
    pthread_setname_np(thread_.native_handle(), "andyllm-mpi");
  }
  ~CollectiveThread() {
    if (thread_.joinable()) stop(std::chrono::milliseconds(0));
  }

  void post(const std::shared_ptr<MpiWork>& work, MpiCall call) {
    work->attach(queue_);
    {
      std::lock_guard<std::mutex> lock(queue_->mu);
      queue_->items.push_back({work, std::move(call)});
    }
    queue_->posted.notify_one();
  }

  // Ends the thread once the FIFO has drained; waits at most `patience` for that, and not at
  // all after a timed-out wait(). Returns false when the thread was detached, still inside a
  // collective: it keeps the queue alive, and the caller must not free the MPI communicator.
  bool stop(std::chrono::milliseconds patience) {
    std::unique_lock<std::mutex> lock(queue_->mu);
    queue_->stop = true;
    queue_->posted.notify_one();
    bool idle = queue_->finished.wait_for(lock, patience, [this] {
      return queue_->stuck || (queue_->items.empty() && !queue_->running);
    }) && !queue_->stuck;
    lock.unlock();
    if (idle) {
      thread_.join();
    } else {
      thread_.detach();
    }
    return idle;
  }

 private:
  static void run(CollectiveQueue& q, MPI_Comm comm) {
    std::unique_lock<std::mutex> lock(q.mu);
    for (;;) {
      q.posted.wait(lock, [&q] { return q.stop || !q.items.empty(); });
      if (q.items.empty()) return;
      CollectiveQueue::Item item = std::move(q.items.front());
      q.items.pop_front();
      q.running = true;
      lock.unlock();
      std::string error;
      int rc = MPI_SUCCESS;
      try {
        rc = item.call.blocking(comm);
      } catch (const std::exception& e) {  // a shared-memory operation run here (post_direct)
        error = e.what();
      }
      if (rc != MPI_SUCCESS) {
        error = where(__FILE__, __LINE__) + item.call.name + " failed in " + item.work->what() +
                ": " + mpi_error_string(rc);
      }
      lock.lock();
      q.running = false;
      q.stuck = false;  // whatever timed out has come back
      item.work->set_ran(std::move(error));
      q.finished.notify_all();
    }
  }

  std::shared_ptr<CollectiveQueue> queue_;
  std::thread thread_;
};

namespace {

// Hands the collective to the communication thread, or starts it nonblocking without one.
WorkPtr issue(MPI_Comm comm, CollectiveThread* thread, std::shared_ptr<MpiWork> work,
              MpiCall call) {
  if (thread) {
    thread->post(work, std::move(call));
    return work;
  }
  int rc = call.start(comm, work->request());
  if (rc != MPI_SUCCESS) {
    throw CommError(where(__FILE__, __LINE__) + call.name + " failed in " + work->what() + ": " +
                    mpi_error_string(rc));
  }
  return work;
}

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

bool mpi_thread_multiple() {
  int provided = MPI_THREAD_SINGLE;
  MPI_CHECK(MPI_Query_thread(&provided));
  return provided == MPI_THREAD_MULTIPLE;
}

}  // namespace

MpiCommunicator::MpiCommunicator(const MpiComm& group, std::string name,
                                 std::chrono::milliseconds timeout, bool use_thread, int64_t shm_bytes)
    : Communicator(group.rank(), group.size(), current_rank() < 0 ? 0 : current_rank(),
                   std::move(name), timeout),
      comm_(group.dup()) {
  MPI_CHECK(MPI_Comm_set_errhandler(comm_.get(), MPI_ERRORS_RETURN));
  if (shm_bytes > 0 && size_ > 1) shm_ = ShmCollectives::create(comm_.get(), shm_bytes);
  if (use_thread && mpi_thread_multiple()) {
    // The thread's own segment, for the direct operations it runs (addresses only: 4 KB slots).
    if (shm_ && shm_->direct_available()) shm_thread_ = ShmCollectives::create(comm_.get(), 4096);
    thread_ = std::make_unique<CollectiveThread>(comm_.get());
  }
}

MpiCommunicator::~MpiCommunicator() {
  if (thread_ && !thread_->stop(timeout_)) {
    log::warn("communicator ", name_, ": its thread is still inside a collective; left running");
    comm_.release();
  }
}

void MpiCommunicator::check_cpu(const at::Tensor& t, const char* op) const {
  ANDY_CHECK_T(CommError, t.device().is_cpu(), describe(op),
               ": the MPI backend takes CPU tensors, got ", t.device());
}

int64_t MpiCommunicator::shm_slot_bytes() const { return shm_ ? shm_->capacity_bytes() : 0; }

WorkPtr MpiCommunicator::post_shm(const char* op, std::vector<ShmPiece> pieces, const std::vector<at::Tensor>& owner,
                                  std::function<void()> on_complete) {
  const auto start = std::chrono::steady_clock::now();
  uint64_t seq = 0;
  for (ShmPiece& p : pieces) {
    seq = shm_->post(p.data, p.bytes, std::move(p.combine), owner, start + timeout_);
    if (seq == 0) throw_collective_timeout(describe(op), start);
  }
  // Completing the last piece completes those before it.
  return std::make_shared<ShmWork>(describe(op), timeout_, shm_, seq, std::move(on_complete));
}

WorkPtr MpiCommunicator::post_direct(const char* op, const void* data, int64_t bytes,
                                     std::vector<ShmCollectives::DirectCombine> steps,
                                     const std::vector<at::Tensor>& owner, std::function<void()> on_complete,
                                     bool on_thread) {
  if (on_thread) {
    // Posted and completed by the communication thread, in its issue order, through a segment
    // of its own (the caller's slot operations keep theirs): it overlaps the caller's work as
    // Open MPI's blocking calls there do.
    auto work = std::make_shared<MpiWork>(describe(op), timeout_);
    for (const at::Tensor& t : owner) work->keep(t);
    if (on_complete) work->on_complete(std::move(on_complete));
    auto run = [shm = shm_thread_, data, bytes, steps = std::move(steps), timeout = timeout_,
                what = describe(op)](MPI_Comm) {
      const auto start = std::chrono::steady_clock::now();
      uint64_t seq = 0;
      for (const auto& step : steps) {
        seq = shm->post_direct(data, bytes, step, {}, start + timeout);
        if (seq == 0) throw_collective_timeout(what, start);
      }
      if (!shm->complete(seq, start + timeout)) throw_collective_timeout(what, start);
      return MPI_SUCCESS;
    };
    return issue(comm_.get(), thread_.get(), work, {"the shared-memory direct reads", run, nullptr});
  }
  const auto start = std::chrono::steady_clock::now();
  uint64_t seq = 0;
  for (auto& step : steps) {
    seq = shm_->post_direct(data, bytes, std::move(step), owner, start + timeout_);
    if (seq == 0) throw_collective_timeout(describe(op), start);
  }
  return std::make_shared<ShmWork>(describe(op), timeout_, shm_, seq, std::move(on_complete));
}

MpiComm MpiCommunicator::dup_group() {
  MPI_Comm out = MPI_COMM_NULL;
  auto work = std::make_shared<MpiWork>(describe("dup_group"), timeout_);
  if (thread_) {
    issue(comm_.get(), thread_.get(), work,
          {"MPI_Comm_dup", [&out](MPI_Comm c) { return MPI_Comm_dup(c, &out); }, nullptr});
    work->wait(std::chrono::milliseconds(0));
  } else {
    MPI_CHECK(MPI_Comm_dup(comm_.get(), &out));
  }
  MpiComm dup(out, true);
  MPI_CHECK(MPI_Comm_set_errhandler(dup.get(), MPI_ERRORS_RETURN));
  return dup;
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
  // Through shared memory: at most a slot on a threaded communicator (larger ones run Open MPI's
  // blocking call at its own speed), any size in slot-size pieces on a polled one (its
  // MPI_Iallreduce runs at under half the blocking call's speed from 1 MB).
  const int64_t slot_floats = shm_ ? shm_->capacity_bytes() / static_cast<int64_t>(sizeof(float)) : 0;
  std::function<void()> copy_back;
  if (!buf.is_same(tensor)) copy_back = [buf, tensor]() mutable { tensor.copy_(buf); };
  // Larger ones read straight from the other ranks' buffers (above 1 MB on a polled
  // communicator; above 4 MB on a threaded one, run by its thread). Each rank reduces its
  // share of the buffer from every rank's (in rank order) into its own buffer, then, once all
  // have, reads the others' reduced shares: two direct operations, one copy of each share per
  // step (where the slots copy everything in and every rank sums it all).
  const int64_t bytes = buf.numel() * static_cast<int64_t>(sizeof(float));
  if (shm_direct() && buf.scalar_type() == at::kFloat &&
      (thread_ ? shm_thread_ && bytes > std::max(kShmDirectThreadedAllReduceBytes, shm_->capacity_bytes())
               : bytes > kShmDirectAllReduceBytes)) {
    float* p = buf.data_ptr<float>();
    const int64_t n = buf.numel();
    const ReduceOp op = opts.op;
    const int me = rank_, size = size_;
    auto reduce_mine = [p, n, op, me, size](const ShmCollectives::Reader& read) {
      const int64_t lo = even_split(n, size, me), hi = even_split(n, size, me + 1);
      if (hi > lo) reduce_direct(read, size, lo * static_cast<int64_t>(sizeof(float)), p + lo, hi - lo, op);
    };
    auto gather_theirs = [p, n, me, size](const ShmCollectives::Reader& read) {
      for (int r = 0; r < size; ++r) {
        if (r == me) continue;
        const int64_t lo = even_split(n, size, r), hi = even_split(n, size, r + 1);
        read(r, lo * static_cast<int64_t>(sizeof(float)), p + lo, (hi - lo) * static_cast<int64_t>(sizeof(float)));
      }
    };
    return post_direct("all_reduce", p, bytes, {reduce_mine, gather_theirs}, {buf}, std::move(copy_back),
                       thread_ != nullptr);
  }
  if (shm_ && buf.scalar_type() == at::kFloat && (!thread_ || buf.numel() <= slot_floats)) {
    float* p = buf.data_ptr<float>();
    const ReduceOp op = opts.op;
    std::vector<ShmPiece> pieces;
    for (int64_t off = 0; off < buf.numel(); off += slot_floats) {
      float* piece = p + off;
      const int64_t n = std::min(slot_floats, buf.numel() - off);
      pieces.push_back({piece, n * static_cast<int64_t>(sizeof(float)),
                        [piece, n, op, size = size_](const std::function<const void*(int)>& slot) {
                          std::vector<const float*> in;
                          for (int r = 0; r < size; ++r) in.push_back(static_cast<const float*>(slot(r)));
                          ShmCollectives::reduce(piece, in, n, op);
                        }});
    }
    return post_shm("all_reduce", std::move(pieces), {buf}, std::move(copy_back));
  }
  void* ptr = buf.data_ptr();
  int count = static_cast<int>(buf.numel());
  MPI_Datatype dt = mpi_copy_type(buf.scalar_type());
  MPI_Op op = mpi_op(opts.op);
  work->keep(buf);
  at::Tensor target = tensor;
  int n = size_;
  ReduceOp reduce = opts.op;
  work->on_complete([buf, target, n, reduce]() mutable {
    if (reduce == ReduceOp::kAvg) buf.div_(n);
    if (!buf.is_same(target)) target.copy_(buf);
  });
  return issue(comm_.get(), thread_.get(), work,
               {"MPI_Allreduce",
                [=](MPI_Comm c) { return MPI_Allreduce(MPI_IN_PLACE, ptr, count, dt, op, c); },
                [=](MPI_Comm c, MPI_Request* r) {
                  return MPI_Iallreduce(MPI_IN_PLACE, ptr, count, dt, op, c, r);
                }});
}

WorkPtr MpiCommunicator::all_gather(at::Tensor& output, const at::Tensor& input,
                                    const AllGatherOptions& opts) {
  check_pair(input, output, "all_gather");
  check_cpu(input, "all_gather");
  check_cpu(output, "all_gather");
  auto counts = resolve_counts(opts.counts, output.numel(), input.numel(), "all_gather");
  const int64_t esize = input.element_size();
  const int64_t out_bytes = output.numel() * esize;
  std::vector<int64_t> offsets(counts.size() + 1, 0);  // in elements
  for (size_t r = 0; r < counts.size(); ++r) offsets[r + 1] = offsets[r] + counts[r];
  // Through shared memory: up to 32 KB gathered through the slots (each part copied twice, into
  // the segment and out of it), larger ones read straight from each rank's buffer (one copy, as
  // Open MPI's CMA does, without its messages); without direct reads, through the slots up to
  // 128 KB (beyond that the second copy costs more than MPI's round trip saves); else MPI.
  // Measured: docs/PERFORMANCE.md, "Collectives".
  constexpr int64_t kSlotsAllGatherBytes = 32 << 10, kSlotsOnlyAllGatherBytes = 128 << 10;
  const bool direct = shm_direct();
  if (direct && out_bytes > std::min(kSlotsAllGatherBytes, shm_->capacity_bytes())) {
    char* out = static_cast<char*>(output.data_ptr());
    auto combine = [out, offsets, esize](const ShmCollectives::Reader& read) {
      for (size_t r = 0; r + 1 < offsets.size(); ++r)
        read(static_cast<int>(r), 0, out + offsets[r] * esize, (offsets[r + 1] - offsets[r]) * esize);
    };
    return post_direct("all_gather", input.numel() ? input.data_ptr() : nullptr, input.numel() * esize, {combine},
                       {input, output}, nullptr);
  }
  if (shm_ && out_bytes <= std::min(direct ? kSlotsAllGatherBytes : kSlotsOnlyAllGatherBytes, shm_->capacity_bytes())) {
    char* out = static_cast<char*>(output.data_ptr());
    auto combine = [out, offsets, esize](const std::function<const void*(int)>& slot) {
      for (size_t r = 0; r + 1 < offsets.size(); ++r) {
        const int64_t n = offsets[r + 1] - offsets[r];
        if (n > 0) std::memcpy(out + offsets[r] * esize, slot(static_cast<int>(r)), static_cast<size_t>(n * esize));
      }
    };
    return post_shm("all_gather", {{input.numel() ? input.data_ptr() : nullptr, input.numel() * esize, combine}},
                    {input, output}, nullptr);
  }
  auto work = std::make_shared<MpiWork>(describe("all_gather"), timeout_);
  auto& c = work->ints(size_);
  auto& d = work->ints(size_);
  displacements(counts, c, d);
  const int* cp = c.data();
  const int* dp = d.data();
  MPI_Datatype dt = mpi_copy_type(input.scalar_type());
  const void* in = input.numel() ? input.data_ptr() : nullptr;
  int count = static_cast<int>(input.numel());
  void* out = output.data_ptr();
  // In place (the input is this rank's part of the output): MPI forbids aliased buffers.
  if (in && in == static_cast<const char*>(out) + offsets[rank_] * esize) in = MPI_IN_PLACE;
  work->keep(input);
  work->keep(output);
  if (opts.counts.empty()) {  // equal shares: the tuned MPI_Allgather
    return issue(comm_.get(), thread_.get(), work,
                 {"MPI_Allgather",
                  [=](MPI_Comm cm) { return MPI_Allgather(in, count, dt, out, count, dt, cm); },
                  [=](MPI_Comm cm, MPI_Request* r) {
                    return MPI_Iallgather(in, count, dt, out, count, dt, cm, r);
                  }});
  }
  return issue(comm_.get(), thread_.get(), work,
               {"MPI_Allgatherv",
                [=](MPI_Comm cm) { return MPI_Allgatherv(in, count, dt, out, cp, dp, dt, cm); },
                [=](MPI_Comm cm, MPI_Request* r) {
                  return MPI_Iallgatherv(in, count, dt, out, cp, dp, dt, cm, r);
                }});
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
  const int* cp = c.data();
  bool narrow = is_narrow_float(input.scalar_type());
  at::Tensor in = narrow ? input.to(at::kFloat) : input;
  at::Tensor out = narrow ? at::empty({output.numel()}, output.options().dtype(at::kFloat)) : output;
  // Through shared memory: this rank's share of every rank's buffer reduced in rank order (every
  // path gives the same bits), through the slots up to a slot, larger ones read straight from
  // every rank's buffer (on a threaded communicator, by its thread).
  const int64_t in_bytes = in.numel() * static_cast<int64_t>(sizeof(float));
  const bool via_direct = shm_direct() && (!thread_ || shm_thread_) && in_bytes > shm_->capacity_bytes();
  if (shm_ && in.scalar_type() == at::kFloat && (via_direct || in_bytes <= shm_->capacity_bytes())) {
    const int64_t mine = counts[rank_];
    const int64_t off = std::accumulate(counts.begin(), counts.begin() + rank_, int64_t{0});
    float* dst = out.numel() ? out.data_ptr<float>() : nullptr;
    const ReduceOp op = opts.op;
    at::Tensor target = output;
    std::function<void()> copy_back;
    if (!out.is_same(target)) copy_back = [out, target]() mutable { target.view({-1}).copy_(out); };
    if (via_direct) {
      auto combine = [dst, mine, off, op, size = size_](const ShmCollectives::Reader& read) {
        if (mine > 0) reduce_direct(read, size, off * static_cast<int64_t>(sizeof(float)), dst, mine, op);
      };
      return post_direct("reduce_scatter", in.data_ptr(), in_bytes, {combine}, {in, out}, std::move(copy_back),
                         thread_ != nullptr);
    }
    auto combine = [dst, mine, off, op, size = size_](const std::function<const void*(int)>& slot) {
      if (mine == 0) return;
      std::vector<const float*> parts;
      for (int r = 0; r < size; ++r) parts.push_back(static_cast<const float*>(slot(r)) + off);
      ShmCollectives::reduce(dst, parts, mine, op);
    };
    return post_shm("reduce_scatter", {{in.numel() ? in.data_ptr() : nullptr, in_bytes, combine}}, {in, out},
                    std::move(copy_back));
  }
  MPI_Datatype dt = mpi_copy_type(in.scalar_type());
  MPI_Op op = mpi_op(opts.op);
  // MPI_Reduce_scatter rejects a null buffer even for zero elements: give it a dummy.
  static float dummy = 0;
  const void* in_ptr = in.numel() ? in.data_ptr() : &dummy;
  void* out_ptr = out.numel() ? out.data_ptr() : &dummy;
  work->keep(in);
  work->keep(out);
  at::Tensor target = output;
  int n = size_;
  ReduceOp reduce = opts.op;
  work->on_complete([out, target, n, reduce]() mutable {
    if (reduce == ReduceOp::kAvg) out.div_(n);
    if (!out.is_same(target)) target.view({-1}).copy_(out);
  });
  return issue(comm_.get(), thread_.get(), work,
               {"MPI_Reduce_scatter",
                [=](MPI_Comm cm) { return MPI_Reduce_scatter(in_ptr, out_ptr, cp, dt, op, cm); },
                [=](MPI_Comm cm, MPI_Request* r) {
                  return MPI_Ireduce_scatter(in_ptr, out_ptr, cp, dt, op, cm, r);
                }});
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
  void* ptr = tensor.data_ptr();
  int count = static_cast<int>(tensor.numel());
  MPI_Datatype dt = mpi_copy_type(tensor.scalar_type());
  work->keep(tensor);
  return issue(comm_.get(), thread_.get(), work,
               {"MPI_Bcast", [=](MPI_Comm c) { return MPI_Bcast(ptr, count, dt, root, c); },
                [=](MPI_Comm c, MPI_Request* r) { return MPI_Ibcast(ptr, count, dt, root, c, r); }});
}

WorkPtr MpiCommunicator::gather(at::Tensor& output, const at::Tensor& input, int root) {
  check_gather(output, input, root);
  check_cpu(input, "gather");
  if (rank_ == root) check_cpu(output, "gather");
  auto work = std::make_shared<MpiWork>(describe("gather"), timeout_);
  MPI_Datatype dt = mpi_copy_type(input.scalar_type());
  const void* in = input.numel() ? input.data_ptr() : nullptr;
  int count = static_cast<int>(input.numel());
  void* out = rank_ == root ? output.data_ptr() : nullptr;
  work->keep(input);
  if (rank_ == root) work->keep(output);
  return issue(comm_.get(), thread_.get(), work,
               {"MPI_Gather", [=](MPI_Comm c) { return MPI_Gather(in, count, dt, out, count, dt, root, c); },
                [=](MPI_Comm c, MPI_Request* r) { return MPI_Igather(in, count, dt, out, count, dt, root, c, r); }});
}

WorkPtr MpiCommunicator::barrier() {
  auto work = std::make_shared<MpiWork>(describe("barrier"), timeout_);
  return issue(comm_.get(), thread_.get(), work,
               {"MPI_Barrier", [](MPI_Comm c) { return MPI_Barrier(c); },
                [](MPI_Comm c, MPI_Request* r) { return MPI_Ibarrier(c, r); }});
}

}  // namespace andy
