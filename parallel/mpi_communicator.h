// MpiCommunicator: the Communicator over MPI, on CPU tensors.
// Collectives run as Open MPI's tuned BLOCKING calls (MPI_Allreduce, MPI_Allgatherv, ...) on one
// communication thread per communicator, in issue order (a FIFO); wait() sleeps on a condition
// variable until the thread has run the call. Where MPI lacks MPI_THREAD_MULTIPLE (or
// use_thread is false) they are nonblocking calls (MPI_Iallreduce, ...) polled by wait().
// bf16/fp16 reductions are done in fp32 staging buffers (one rounding at the end, exact for
// values representable in the narrow type); copies (gather, broadcast) move raw 16-bit words.
// Optionally, small collectives within one node go through shared memory instead (shm_bytes).
// The communicator owns a duplicate of the MPI communicator it was given, so its collectives
// never match anyone else's; every MPI call on that duplicate goes through the FIFO.
#pragma once

#include <memory>

#include "parallel/communicator.h"
#include "parallel/mpi_utils.h"
#include "parallel/shm_collectives.h"

namespace andy {

class CollectiveThread;

// The MPI datatype that moves a tensor's elements bit for bit (bf16/fp16 as 16-bit words;
// MPI_DATATYPE_NULL for other dtypes).
MPI_Datatype mpi_copy_type(at::ScalarType t);

class MpiCommunicator : public Communicator {
 public:
  // `group` is duplicated; the original may be freed afterwards. use_thread (Default: true)
  // picks the communication thread when MPI provides MPI_THREAD_MULTIPLE. shm_bytes > 0 (collective
  // like the constructor): when every rank of the group is on this node and /dev/shm has room,
  // collectives go through shared memory (parallel/shm_collectives.h) where each rank's part fits
  // a slot of shm_bytes: all_reduce and reduce_scatter (fp32, and bf16 / fp16 in fp32) through
  // the slots up to a slot (up to 1 MB for all_reduce without a thread), larger ones read
  // directly from the other ranks' buffers (by the thread when there is one), all_gather of any
  // dtype and size (up to 32 KB gathered through the slots, larger ones direct). Without direct
  // reads (not allowed, or ANDYLLM_MPI_SHM_DIRECT=0): all_reduce of any size in slot-size
  // pieces when there is no thread, all_gather through the slots up to 128 KB. Broadcast,
  // gather, barrier, integer reductions and what is left keep MPI.
  MpiCommunicator(const MpiComm& group, std::string name, std::chrono::milliseconds timeout,
                  bool use_thread = true, int64_t shm_bytes = 0);
  // Lets the communication thread finish what was issued, then joins it. A thread stuck in a
  // collective (after a TimeoutError, or still busy after timeout()) is detached instead, and
  // the MPI communicator it uses is not freed: the job is ending through MPI_Abort anyway.
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  Backend backend() const override { return Backend::kMpi; }
  WorkPtr all_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {}) override;
  WorkPtr all_gather(at::Tensor& output, const at::Tensor& input,
                     const AllGatherOptions& opts = {}) override;
  WorkPtr reduce_scatter(at::Tensor& output, const at::Tensor& input,
                         const ReduceScatterOptions& opts = {}) override;
  WorkPtr broadcast(at::Tensor& tensor, int root) override;
  WorkPtr gather(at::Tensor& output, const at::Tensor& input, int root) override;
  WorkPtr barrier() override;

  // True when collectives run on the communication thread, false when polled nonblocking.
  bool threaded() const { return thread_ != nullptr; }
  // The slot size of the shared-memory collectives; 0 when this communicator has none.
  int64_t shm_slot_bytes() const;
  // True when its shared-memory collectives may read the other ranks' buffers directly.
  bool shm_direct() const { return shm_ && shm_->direct_available(); }
  // A new MPI communicator over the same group (MPI_Comm_dup, ordered after every collective
  // issued so far). For callers that need raw MPI calls beside this communicator (bench comm).
  MpiComm dup_group();

 private:
  void check_cpu(const at::Tensor& t, const char* op) const;
  // One shared-memory operation per piece (a collective's data, or an all-reduce's slot-size
  // pieces), all within one timeout; a Work that completes them all, then runs on_complete.
  struct ShmPiece {
    const void* data;
    int64_t bytes;
    ShmCollectives::Combine combine;
  };
  WorkPtr post_shm(const char* op, std::vector<ShmPiece> pieces, const std::vector<at::Tensor>& owner,
                   std::function<void()> on_complete);
  // Direct shared-memory operations on one buffer (`data`, `bytes`), one per step, in order;
  // on_thread: run by the communication thread (through shm_thread_), else completed by wait().
  WorkPtr post_direct(const char* op, const void* data, int64_t bytes, std::vector<ShmCollectives::DirectCombine> steps,
                      const std::vector<at::Tensor>& owner, std::function<void()> on_complete, bool on_thread = false);

  MpiComm comm_;
  std::unique_ptr<CollectiveThread> thread_;  // null: nonblocking collectives polled by wait()
  std::shared_ptr<ShmCollectives> shm_;       // null: every collective through MPI
  std::shared_ptr<ShmCollectives> shm_thread_;  // the thread's direct operations; null: MPI there
};

}  // namespace andy
