// ProcessGrid: the tensor x data parallel layout of the world, TP innermost as in Megatron-LM:
//   rank = tp_rank + tp_size * dp_rank
// so the ranks of one TP group are adjacent (same node, same NVLink domain). The grid owns one
// communicator for the world, one for this rank's TP group and one for its DP group.
// Construction is collective over the world. Must not outlive the World.
//
//   GridOptions o;
//   o.tensor_parallel_size = 2;
//   ProcessGrid grid(world, o);
//   grid.tp().all_reduce(t);
#pragma once

#include <memory>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/world.h"

namespace andy {

struct GridCoords {
  int tp_rank;
  int dp_rank;
  bool operator==(const GridCoords& o) const { return tp_rank == o.tp_rank && dp_rank == o.dp_rank; }
};

// Pure mapping (no MPI), for tests and planning. Throws ConfigError when world % tp != 0.
GridCoords grid_coords(int rank, int world_size, int tp_size);
// World ranks of the TP group holding dp_rank, and of the DP group holding tp_rank.
std::vector<int> tp_group_ranks(int dp_rank, int world_size, int tp_size);
std::vector<int> dp_group_ranks(int tp_rank, int world_size, int tp_size);

struct GridOptions {
  int tensor_parallel_size = 1;  // Default: 1 (pure data parallel).
  Backend backend = Backend::kMpi;  // Default: MPI on CPU tensors.
  int device = -1;  // CUDA device for the NCCL backend; -1 for CPU.
  std::chrono::milliseconds timeout{300000};  // Default: 300 s.
};

// Whether the NCCL backend was compiled into this build (the CUDA toolkit and NCCL were found
// at configure time); the backend conditionals stay in parallel/.
bool nccl_compiled_in();

// The slot size of the grid's shared-memory collectives on MPI (see make_communicator).
constexpr int64_t kShmSlotBytes = int64_t{1} << 20;

// Makes a communicator of `backend` over `group` (collective over the group).
// Throws CommError when the backend was not compiled in. On MPI, `comm_thread` picks the
// communication thread (tuned blocking collectives, for the asynchronous gradient all-reduces)
// over nonblocking collectives polled by the caller (lower latency for the small synchronous
// ones of tensor parallelism: a decode step's all-reduces of a few KB). ANDYLLM_MPI_COMM_THREAD
// = 0 / 1 overrides it for every communicator. shm_bytes > 0: collectives that fit slots of
// that many bytes go through shared memory when the group is on one node (MpiCommunicator);
// ANDYLLM_MPI_SHM_BYTES overrides the size for the communicators that have it (0: off).
CommPtr make_communicator(Backend backend, const MpiComm& group, const std::string& name,
                          int device, std::chrono::milliseconds timeout, bool comm_thread = true,
                          int64_t shm_bytes = 0);

class ProcessGrid {
 public:
  ProcessGrid(const World& world, const GridOptions& opts);

  int world_size() const { return world_size_; }
  int rank() const { return rank_; }
  int tp_size() const { return tp_size_; }
  int dp_size() const { return world_size_ / tp_size_; }
  int tp_rank() const { return coords_.tp_rank; }
  int dp_rank() const { return coords_.dp_rank; }

  Communicator& world() { return *world_comm_; }
  Communicator& tp() { return *tp_comm_; }
  Communicator& dp() { return *dp_comm_; }
  CommPtr world_ptr() const { return world_comm_; }
  CommPtr tp_ptr() const { return tp_comm_; }
  CommPtr dp_ptr() const { return dp_comm_; }

 private:
  int world_size_, rank_, tp_size_;
  GridCoords coords_;
  MpiComm tp_mpi_, dp_mpi_;
  CommPtr world_comm_, tp_comm_, dp_comm_;
};

// The communicators a training run uses (TrainGrid::from(grid)). Null (or size-1) communicators
// mean a single rank in that dimension, so a test can run a TP=1 x DP=1 reference inside a
// multi-rank job.
struct TrainGrid {
  CommPtr world, tp, dp;
  int cuda_device = -1;  // this rank's GPU with train.device = cuda (-1: CPU, or GPU 0)
  int world_size() const { return world ? world->size() : 1; }
  int rank() const { return world ? world->rank() : 0; }
  int tp_size() const { return tp ? tp->size() : 1; }
  int tp_rank() const { return tp ? tp->rank() : 0; }
  int dp_size() const { return dp ? dp->size() : 1; }
  int dp_rank() const { return dp ? dp->rank() : 0; }
  static TrainGrid from(const ProcessGrid& g, int cuda_device = -1) {
    return {g.world_ptr(), g.tp_ptr(), g.dp_ptr(), cuda_device};
  }
  static TrainGrid single() { return {}; }
};

}  // namespace andy
