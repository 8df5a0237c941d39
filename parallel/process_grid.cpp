// Rank grid (TP innermost) and the communicator factory.
#include "parallel/process_grid.h"

#include <cstdlib>

#include "parallel/mpi_communicator.h"
#if defined(ANDYLLM_HAVE_NCCL)
#include "parallel/nccl_communicator.h"
#endif

namespace andy {

GridCoords grid_coords(int rank, int world_size, int tp_size) {
  ANDY_CHECK_T(ConfigError, tp_size >= 1 && world_size >= 1 && world_size % tp_size == 0,
               "world size ", world_size, " is not divisible by tensor_parallel_size ", tp_size);
  ANDY_CHECK_T(ConfigError, rank >= 0 && rank < world_size, "rank ", rank, " outside world of ",
               world_size);
  return {rank % tp_size, rank / tp_size};
}

std::vector<int> tp_group_ranks(int dp_rank, int world_size, int tp_size) {
  std::vector<int> out;
  for (int t = 0; t < tp_size; ++t) out.push_back(t + tp_size * dp_rank);
  return out;
}

std::vector<int> dp_group_ranks(int tp_rank, int world_size, int tp_size) {
  std::vector<int> out;
  for (int d = 0; d < world_size / tp_size; ++d) out.push_back(tp_rank + tp_size * d);
  return out;
}

bool nccl_compiled_in() {
#if defined(ANDYLLM_HAVE_NCCL)
  return true;
#else
  return false;
#endif
}

CommPtr make_communicator(Backend backend, const MpiComm& group, const std::string& name,
                          int device, std::chrono::milliseconds timeout, bool comm_thread, int64_t shm_bytes) {
  if (backend == Backend::kMpi) {
    const char* env = std::getenv("ANDYLLM_MPI_COMM_THREAD");
    if (env && (std::string(env) == "0" || std::string(env) == "1")) comm_thread = std::string(env) == "1";
    const char* shm_env = std::getenv("ANDYLLM_MPI_SHM_BYTES");
    if (shm_bytes > 0 && shm_env && *shm_env) shm_bytes = std::atoll(shm_env);
    return std::make_shared<MpiCommunicator>(group, name, timeout, comm_thread, shm_bytes);
  }
#if defined(ANDYLLM_HAVE_NCCL)
  return std::make_shared<NcclCommunicator>(group, device, name, timeout);
#else
  throw CommError("the NCCL backend is not compiled into this build (CUDA toolkit or NCCL not "
                  "found at configure time); use parallel.backend=mpi with --device cpu");
#endif
}

ProcessGrid::ProcessGrid(const World& world, const GridOptions& opts)
    : world_size_(world.size()), rank_(world.rank()), tp_size_(opts.tensor_parallel_size),
      coords_(grid_coords(world.rank(), world.size(), opts.tensor_parallel_size)) {
  tp_mpi_ = world.comm().split(coords_.dp_rank, coords_.tp_rank);
  dp_mpi_ = world.comm().split(coords_.tp_rank, coords_.dp_rank);
  // On one node, collectives of up to 1 MB per rank go through shared memory on every group
  // (64 KB: 1.1-2x Open MPI's blocking calls here; docs/PERFORMANCE.md, "Collectives"); larger
  // ones run on the communication thread (all_reduce and reduce_scatter reading the other
  // ranks' buffers directly, the rest as Open MPI's blocking calls),
  world_comm_ = make_communicator(opts.backend, world.comm(), "world", opts.device, opts.timeout,
                                  /*comm_thread=*/true, kShmSlotBytes);
  // except on the tensor-parallel group: its collectives are synchronous and, when decoding, a
  // few KB: polled, no thread (tiny model, TP=2, one sequence: 4,500 against 3,600 tokens/s
  // through the thread), and all-reduces and reduce-scatters of any size through shared memory,
  // above 1 MB read directly from the other ranks' buffers (4-64 MB: 1.1-1.6x the blocking
  // MPI_Allreduce, where the polled MPI_Iallreduce reaches 0.4x).
  tp_comm_ = make_communicator(opts.backend, tp_mpi_, "tp[dp_rank=" + std::to_string(dp_rank()) + "]",
                               opts.device, opts.timeout, /*comm_thread=*/false, kShmSlotBytes);
  dp_comm_ = make_communicator(opts.backend, dp_mpi_, "dp[tp_rank=" + std::to_string(tp_rank()) + "]",
                               opts.device, opts.timeout, /*comm_thread=*/true, kShmSlotBytes);
}

}  // namespace andy
