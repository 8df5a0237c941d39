// NCCL backend of the Communicator (see nccl_communicator.h for the stream contract).
// Uneven all_gather / reduce_scatter shares are expressed as grouped broadcasts / reduces.
#if defined(ANDYLLM_HAVE_NCCL)

#include "parallel/nccl_communicator.h"

#include <thread>

#include "core/base/logging.h"
#include "core/base/torch_compat.h"

namespace andy {

ncclDataType_t nccl_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: case at::kBool: return ncclUint8;
    case at::kChar: return ncclInt8;
    default: return ncclFloat32;
  }
}

namespace {

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

cudaStream_t caller_stream(int device) {
#if defined(ANDYLLM_TORCH_CUDA)
  return compat::current_cuda_stream(device);
#else
  (void)device;
  return nullptr;  // legacy default stream
#endif
}

class NcclWork : public Work {
 public:
  NcclWork(std::string what, ncclComm_t comm, int device, cudaEvent_t event,
           std::vector<at::Tensor> keep, std::chrono::milliseconds default_timeout)
      : what_(std::move(what)), comm_(comm), device_(device), event_(event),
        keep_(std::move(keep)), default_timeout_(default_timeout) {}
  ~NcclWork() override {
    if (event_) cudaEventDestroy(event_);
  }

  bool is_completed() override {
    if (done_) return true;
    cudaError_t rc = cudaEventQuery(event_);
    if (rc == cudaSuccess) {
      done_ = true;
      // Later work on the caller's stream runs after the collective.
      CUDA_CHECK(cudaStreamWaitEvent(caller_stream(device_), event_, 0));
      keep_.clear();
      return true;
    }
    if (rc != cudaErrorNotReady) CUDA_CHECK(rc);
    ncclResult_t async_err = ncclSuccess;
    NCCL_CHECK(ncclCommGetAsyncError(comm_, &async_err));
    if (async_err != ncclSuccess && async_err != ncclInProgress) {
      ANDY_THROW(CommError, "collective ", what_, " failed asynchronously: ",
                 ncclGetErrorString(async_err));
    }
    return false;
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (timeout.count() <= 0) timeout = default_timeout_;
    auto start = std::chrono::steady_clock::now();
    while (!is_completed()) {
      if (std::chrono::steady_clock::now() - start >= timeout) {
        ncclCommAbort(comm_);
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        ANDY_THROW(TimeoutError, "collective ", what_, " did not complete within ",
                   std::to_string(secs).substr(0, 5),
                   " s (parallel.collective_timeout_s): another rank skipped it, died or is "
                   "stuck; NCCL communicator aborted, aborting the job");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

 private:
  std::string what_;
  ncclComm_t comm_;
  int device_;
  cudaEvent_t event_;
  std::vector<at::Tensor> keep_;
  std::chrono::milliseconds default_timeout_;
  bool done_ = false;
};

}  // namespace

NcclCommunicator::NcclCommunicator(const MpiComm& group, int device, std::string name,
                                   std::chrono::milliseconds timeout)
    : Communicator(group.rank(), group.size(), current_rank() < 0 ? 0 : current_rank(),
                   std::move(name), timeout),
      device_(device) {
  CUDA_CHECK(cudaSetDevice(device_));
  ncclUniqueId id;
  if (rank_ == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, group.get()));
  NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
#if defined(ANDYLLM_TORCH_CUDA)
  // A stream of LibTorch's pool, never destroyed: tensors recorded on it (record_stream) may be
  // freed after this communicator, and the caching allocator then records an event on the stream
  // (a destroyed one crashed at exit, seen on an H200 with LibTorch 2.11).
  stream_ = compat::pool_cuda_stream(device_);
#else
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  owns_stream_ = true;
#endif
}

NcclCommunicator::~NcclCommunicator() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (comm_) ncclCommDestroy(comm_);
  if (stream_ && owns_stream_) cudaStreamDestroy(stream_);
}

void NcclCommunicator::check_device(const at::Tensor& t, const char* op) const {
  ANDY_CHECK_T(CommError, t.device().is_cuda() && t.device().index() == device_, describe(op),
               ": the NCCL backend takes tensors on cuda:", device_, ", got ", t.device());
}

void NcclCommunicator::enter() {
  cudaEvent_t ready;
  CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(ready, caller_stream(device_)));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, ready, 0));
  CUDA_CHECK(cudaEventDestroy(ready));
}

WorkPtr NcclCommunicator::finish(const char* op, std::vector<at::Tensor> keep) {
  cudaEvent_t done;
  CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(done, stream_));
#if defined(ANDYLLM_TORCH_CUDA)
  for (const auto& t : keep) compat::record_stream(t, stream_);
#endif
  return std::make_shared<NcclWork>(describe(op), comm_, device_, done, std::move(keep), timeout_);
}

WorkPtr NcclCommunicator::all_reduce(at::Tensor& tensor, const AllReduceOptions& opts) {
  check_tensor(tensor, "all_reduce", "input");
  check_device(tensor, "all_reduce");
  check_reduction(tensor, opts.op, "all_reduce");
  enter();
  NCCL_CHECK(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                           nccl_dtype(tensor.scalar_type()), nccl_op(opts.op), comm_, stream_));
  return finish("all_reduce", {tensor});
}

WorkPtr NcclCommunicator::all_gather(at::Tensor& output, const at::Tensor& input,
                                     const AllGatherOptions& opts) {
  check_pair(input, output, "all_gather");
  check_device(input, "all_gather");
  check_device(output, "all_gather");
  auto counts = resolve_counts(opts.counts, output.numel(), input.numel(), "all_gather");
  auto dt = nccl_dtype(input.scalar_type());
  size_t elem = input.element_size();
  enter();
  if (opts.counts.empty()) {
    NCCL_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), dt, comm_, stream_));
  } else {
    NCCL_CHECK(ncclGroupStart());
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      char* dst = static_cast<char*>(output.data_ptr()) + off * elem;
      const void* src = r == rank_ ? input.data_ptr() : dst;
      NCCL_CHECK(ncclBroadcast(src, dst, counts[r], dt, r, comm_, stream_));
      off += counts[r];
    }
    NCCL_CHECK(ncclGroupEnd());
  }
  return finish("all_gather", {input, output});
}

WorkPtr NcclCommunicator::reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                         const ReduceScatterOptions& opts) {
  check_pair(input, output, "reduce_scatter");
  check_device(input, "reduce_scatter");
  check_device(output, "reduce_scatter");
  check_reduction(input, opts.op, "reduce_scatter");
  auto counts = resolve_counts(opts.counts, input.numel(), output.numel(), "reduce_scatter");
  auto dt = nccl_dtype(input.scalar_type());
  size_t elem = input.element_size();
  enter();
  if (opts.counts.empty()) {
    NCCL_CHECK(ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(), dt,
                                 nccl_op(opts.op), comm_, stream_));
  } else {
    NCCL_CHECK(ncclGroupStart());
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      const char* src = static_cast<const char*>(input.data_ptr()) + off * elem;
      void* dst = r == rank_ ? output.data_ptr() : nullptr;
      NCCL_CHECK(ncclReduce(src, dst, counts[r], dt, nccl_op(opts.op), r, comm_, stream_));
      off += counts[r];
    }
    NCCL_CHECK(ncclGroupEnd());
  }
  return finish("reduce_scatter", {input, output});
}

WorkPtr NcclCommunicator::broadcast(at::Tensor& tensor, int root) {
  check_tensor(tensor, "broadcast", "input");
  check_device(tensor, "broadcast");
  ANDY_CHECK_T(CommError, root >= 0 && root < size_, describe("broadcast"), ": root ", root,
               " outside the group of ", size_);
  enter();
  NCCL_CHECK(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                           nccl_dtype(tensor.scalar_type()), root, comm_, stream_));
  return finish("broadcast", {tensor});
}

WorkPtr NcclCommunicator::gather(at::Tensor& output, const at::Tensor& input, int root) {
  check_gather(output, input, root);
  check_device(input, "gather");
  if (rank_ == root) check_device(output, "gather");
  auto dt = nccl_dtype(input.scalar_type());
  const size_t bytes = static_cast<size_t>(input.numel()) * input.element_size();
  enter();
  // Point to point in one group: every rank sends to the root, which receives from each (itself
  // included).
  NCCL_CHECK(ncclGroupStart());
  NCCL_CHECK(ncclSend(input.data_ptr(), input.numel(), dt, root, comm_, stream_));
  if (rank_ == root)
    for (int r = 0; r < size_; ++r)
      NCCL_CHECK(ncclRecv(static_cast<char*>(output.data_ptr()) + r * bytes, input.numel(), dt, r, comm_, stream_));
  NCCL_CHECK(ncclGroupEnd());
  return finish("gather", rank_ == root ? std::vector<at::Tensor>{input, output} : std::vector<at::Tensor>{input});
}

WorkPtr NcclCommunicator::barrier() {
  if (!barrier_buf_.defined()) {
    barrier_buf_ = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_));
  }
  enter();
  NCCL_CHECK(ncclAllReduce(barrier_buf_.data_ptr(), barrier_buf_.data_ptr(), 1, ncclFloat32,
                           ncclSum, comm_, stream_));
  return finish("barrier", {barrier_buf_});
}

}  // namespace andy

#endif  // ANDYLLM_HAVE_NCCL
