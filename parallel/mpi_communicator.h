// MpiCommunicator: the Communicator over MPI nonblocking collectives, on CPU tensors.
// bf16/fp16 reductions are done in fp32 staging buffers (one rounding at the end, exact for
// values representable in the narrow type); copies (gather, broadcast) move raw 16-bit words.
// The communicator owns a duplicate of the MPI communicator it was given, so its collectives
// never match anyone else's.
#pragma once

#include "parallel/communicator.h"
#include "parallel/mpi_utils.h"

namespace andy {

class MpiCommunicator : public Communicator {
 public:
  // `group` is duplicated; the original may be freed afterwards.
  MpiCommunicator(const MpiComm& group, std::string name, std::chrono::milliseconds timeout);

  Backend backend() const override { return Backend::kMpi; }
  WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {}) override;
  WorkPtr all_gather(at::Tensor& output, const at::Tensor& input,
                     const AllGatherOptions& opts = {}) override;
  WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input,
                         const ReduceScatterOptions& opts = {}) override;
  WorkPtr broadcast(at::Tensor& tensor, int root) override;
  WorkPtr barrier() override;

  MPI_Comm mpi_comm() const { return comm_.get(); }

 private:
  void check_cpu(const at::Tensor& t, const char* op) const;

  MpiComm comm_;
};

}  // namespace andy
