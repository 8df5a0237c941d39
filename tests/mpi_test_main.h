// Access to the World created by mpi_test_main.cpp, for multi-rank tests.
#pragma once

#include "parallel/world.h"

namespace andy {
// The process's World (valid during RUN_ALL_TESTS).
World& test_world();
}  // namespace andy
