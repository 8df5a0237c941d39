// World: the MPI job this process belongs to. Initialises MPI (MPI_THREAD_MULTIPLE requested,
// at least SERIALIZED required), knows rank, size, the local rank among ranks on the same
// host, and the GPU a local rank uses. One World per process; it must outlive every
// communicator made from it. MPI is finalised when the World is destroyed.
//
// Errors: World::abort() prints nothing itself; callers log first, then abort so that every
// rank ends instead of hanging in a collective.
#pragma once

#include <string>

#include "parallel/mpi_utils.h"

namespace andy {

class World {
 public:
  // Initialises MPI (a singleton run without mpirun works too).
  World(int* argc, char*** argv);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  const std::string& hostname() const { return hostname_; }
  bool is_root() const { return rank_ == 0; }
  const MpiComm& comm() const { return world_; }

  // GPU index for this local rank: local_rank % n_devices (warns when ranks share a GPU);
  // -1 when no device is visible.
  int device_for_local_rank(int n_devices) const;

  // The CUDA device's name ("NVIDIA H100 80GB HBM3"); "" in a build without CUDA.
  static std::string gpu_name(int device);

  // Ends every rank of the job with `code` (MPI_Abort on MPI_COMM_WORLD).
  [[noreturn]] static void abort(int code);
  // True once MPI_Init has run in this process and MPI is not finalised.
  static bool mpi_active();

 private:
  MpiComm world_;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  std::string hostname_;
};

}  // namespace andy
