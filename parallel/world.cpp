// MPI lifetime, local ranks (ranks sharing a host) and GPU assignment.
#include "parallel/world.h"

#include <unistd.h>

#include <cstdlib>

#include "core/base/logging.h"
#if defined(ANDYLLM_HAVE_NCCL)
#include "parallel/cuda_utils.h"
#endif

namespace andy {

World::World(int* argc, char*** argv) {
  int initialized = 0;
  MPI_CHECK(MPI_Initialized(&initialized));
  if (!initialized) {
    int provided = 0;
    MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    if (provided < MPI_THREAD_SERIALIZED) {
      throw CommError("MPI provides thread level " + std::to_string(provided) +
                      "; AndyLLM needs at least MPI_THREAD_SERIALIZED");
    }
  }
  // Errors come back as codes so MPI_CHECK can report them with rank and location.
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  world_ = MpiComm(MPI_COMM_WORLD, false);
  rank_ = world_.rank();
  size_ = world_.size();
  set_current_rank(rank_);

  MPI_Comm shared;
  MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &shared));
  MpiComm local(shared, true);
  local_rank_ = local.rank();
  local_size_ = local.size();

  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  hostname_ = host;
}

World::~World() {
  world_ = MpiComm();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::string World::gpu_name(int device) {
#if defined(ANDYLLM_HAVE_NCCL)
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "";
  return prop.name;
#else
  (void)device;
  return "";
#endif
}

int World::device_for_local_rank(int n_devices) const {
  if (n_devices <= 0) return -1;
  if (local_size_ > n_devices) {
    log::warn(local_size_, " ranks on host ", hostname_, " share ", n_devices,
              " GPUs: local rank ", local_rank_, " uses GPU ", local_rank_ % n_devices);
  }
  return local_rank_ % n_devices;
}

void World::abort(int code) {
  if (mpi_active()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

bool World::mpi_active() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

}  // namespace andy
