// `andyllm version`: versions of AndyLLM and of the libraries it was built with.
#include <mpi.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

#include "core/base/torch_compat.h"
#include "core/model/fused_ops.h"
#include "launch/commands.h"
#include "parallel/process_grid.h"

namespace andy {

Subcommand make_version_command() {
  Subcommand c;
  c.name = "version";
  c.summary = "print versions of AndyLLM and its libraries, and which GPU parts were built";
  c.usage = "usage: andyllm version";
  c.run = [](const ParsedArgs&, World*) {
    char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(mpi, &len);
    std::string mpi_s(mpi, len);
    mpi_s = mpi_s.substr(0, mpi_s.find_first_of(",\n"));
    std::printf("andyllm %s\n", ANDYLLM_VERSION);
    std::printf("  libtorch  %s (%s)\n", TORCH_VERSION,
                compat::torch_has_cuda() ? "with CUDA" : "CPU only");
    std::printf("  mpi       %s\n", mpi_s.c_str());
    std::printf("  nccl      %s\n", nccl_compiled_in() ? "compiled in"
                                                         : "not compiled in (CUDA toolkit or NCCL not found at build time)");
    std::printf("  threads   %d intra-op; our CPU kernels use %d\n", at::get_num_threads(), kernel_threads());
#if ANDYLLM_OPENMP
    std::printf("  openmp    on: our CPU kernels split their work over the intra-op threads\n");
#else
    std::printf("  openmp    off: our CPU kernels run on the calling thread (see cmake's OpenMP line)\n");
#endif
    return 0;
  };
  return c;
}

}  // namespace andy
