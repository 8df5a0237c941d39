// NcclCommunicator: the Communicator over NCCL, on CUDA tensors of one device.
// Bootstrapped over MPI as llm.c does: group rank 0 calls ncclGetUniqueId, MPI_Bcast shares
// it, every rank calls ncclCommInitRank. Collectives run on the communicator's own stream,
// ordered after the work already queued on LibTorch's current stream; wait() blocks the host
// until done (polling the event, so a hang becomes a TimeoutError after ncclCommAbort), then
// the current stream is ordered after the collective.
// Only compiled with ANDYLLM_HAVE_NCCL; make_communicator() reports its absence otherwise.
#pragma once

#if defined(ANDYLLM_HAVE_NCCL)

#include "parallel/communicator.h"
#include "parallel/cuda_utils.h"
#include "parallel/mpi_utils.h"

namespace andy {

// NCCL's datatype for a tensor dtype.
ncclDataType_t nccl_dtype(at::ScalarType t);

class NcclCommunicator : public Communicator {
 public:
  // Collective over `group` (every rank must call); `device` is this rank's CUDA device.
  NcclCommunicator(const MpiComm& group, int device, std::string name,
                   std::chrono::milliseconds timeout);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  Backend backend() const override { return Backend::kNccl; }
  WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {}) override;
  WorkPtr all_gather(at::Tensor& output, const at::Tensor& input,
                     const AllGatherOptions& opts = {}) override;
  WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input,
                         const ReduceScatterOptions& opts = {}) override;
  WorkPtr broadcast(at::Tensor& tensor, int root) override;
  WorkPtr gather(at::Tensor& output, const at::Tensor& input, int root) override;
  WorkPtr barrier() override;

  // For raw NCCL calls beside this communicator (bench comm): they must not run while one of
  // its collectives is in flight.
  ncclComm_t nccl_comm() const { return comm_; }
  int device() const { return device_; }

 private:
  void check_device(const at::Tensor& t, const char* op) const;
  // Orders stream_ after the caller's current stream.
  void enter();
  // Records completion and returns the handle.
  WorkPtr finish(const char* op, std::vector<at::Tensor> keep);

  int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;  // created here (CPU LibTorch) rather than taken from LibTorch's pool
  at::Tensor barrier_buf_;
};

}  // namespace andy

#endif  // ANDYLLM_HAVE_NCCL
