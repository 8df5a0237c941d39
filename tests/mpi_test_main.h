// Access to the World created by mpi_test_main.cpp, for multi-rank tests.
#pragma once

#include "parallel/communicator.h"
#include "parallel/world.h"

namespace andy {
// The process's World (valid during RUN_ALL_TESTS).
World& test_world();
// An MPI communicator over MPI_COMM_WORLD (60 s timeout), made once.
CommPtr test_world_comm();
}  // namespace andy
