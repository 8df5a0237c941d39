// The raw columns of `andyllm bench comm`: each op as the library's own blocking call (see
// RawCollectives in comm_bench.h). Sums, equal shares; no staging, no timeout, no checks beyond
// the library's own.
#include <mpi.h>

#include "parallel/comm_bench.h"
#include "parallel/mpi_communicator.h"
#include "parallel/mpi_utils.h"
#if defined(ANDYLLM_HAVE_NCCL)
#include "core/base/torch_compat.h"
#include "parallel/nccl_communicator.h"
#endif

namespace andy {

namespace {

// MPI has no bf16/fp16 reduction: narrow floats move as 16-bit words and are not reduced here
// (mpi_copy_type).
class RawMpi : public RawCollectives {
 public:
  explicit RawMpi(MpiComm comm) : comm_(std::move(comm)), size_(comm_.size()) {}
  std::string name() const override { return "raw mpi"; }
  bool can_reduce(at::ScalarType t) const override { return t != at::kBFloat16 && t != at::kHalf; }

  void all_reduce(at::Tensor& t) override {
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(t.numel()),
                            mpi_copy_type(t.scalar_type()), MPI_SUM, comm_.get()));
  }
  void all_gather(at::Tensor& out, const at::Tensor& in) override {
    MPI_Datatype dt = mpi_copy_type(in.scalar_type());
    int n = static_cast<int>(in.numel());
    MPI_CHECK(MPI_Allgather(in.data_ptr(), n, dt, out.data_ptr(), n, dt, comm_.get()));
  }
  void reduce_scatter(at::Tensor& out, const at::Tensor& in) override {
    std::vector<int> counts(size_, static_cast<int>(out.numel()));
    MPI_CHECK(MPI_Reduce_scatter(in.data_ptr(), out.data_ptr(), counts.data(),
                                 mpi_copy_type(in.scalar_type()), MPI_SUM, comm_.get()));
  }
  void broadcast(at::Tensor& t, int root) override {
    MPI_CHECK(MPI_Bcast(t.data_ptr(), static_cast<int>(t.numel()), mpi_copy_type(t.scalar_type()),
                        root, comm_.get()));
  }

 private:
  MpiComm comm_;
  int size_;
};

#if defined(ANDYLLM_HAVE_NCCL)
class RawNccl : public RawCollectives {
 public:
  explicit RawNccl(const NcclCommunicator& comm) : comm_(comm.nccl_comm()), device_(comm.device()) {}
  std::string name() const override { return "raw nccl"; }
  bool can_reduce(at::ScalarType) const override { return true; }

  void all_reduce(at::Tensor& t) override {
    cudaStream_t s = stream();
    NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()),
                             ncclSum, comm_, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }
  void all_gather(at::Tensor& out, const at::Tensor& in) override {
    cudaStream_t s = stream();
    NCCL_CHECK(ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_dtype(in.scalar_type()),
                             comm_, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }
  void reduce_scatter(at::Tensor& out, const at::Tensor& in) override {
    cudaStream_t s = stream();
    NCCL_CHECK(ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(),
                                 nccl_dtype(in.scalar_type()), ncclSum, comm_, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }
  void broadcast(at::Tensor& t, int root) override {
    cudaStream_t s = stream();
    NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.scalar_type()),
                             root, comm_, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }

 private:
  // LibTorch's current stream: the one the benchmark's buffers were written on.
  cudaStream_t stream() const {
#if defined(ANDYLLM_TORCH_CUDA)
    return compat::current_cuda_stream(device_);
#else
    return nullptr;  // legacy default stream
#endif
  }

  ncclComm_t comm_;
  int device_;
};
#endif  // ANDYLLM_HAVE_NCCL

}  // namespace

std::unique_ptr<RawCollectives> make_raw_collectives(Communicator& comm) {
  if (auto* mpi = dynamic_cast<MpiCommunicator*>(&comm)) return std::make_unique<RawMpi>(mpi->dup_group());
#if defined(ANDYLLM_HAVE_NCCL)
  if (auto* nccl = dynamic_cast<NcclCommunicator*>(&comm)) return std::make_unique<RawNccl>(*nccl);
#endif
  ANDY_THROW(CommError, "bench comm: no raw collectives for the ", backend_name(comm.backend()),
             " backend");
}

}  // namespace andy
