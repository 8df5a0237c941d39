// The cores a process may run on, for sizing its thread pools.
#pragma once

#include <sched.h>

#include <algorithm>
#include <thread>

namespace andy {

// Cores in this process's affinity mask (mpirun binds each rank to one core by default when
// there are at most 2 ranks); the host's cores where the mask cannot be read.
inline int cores_available() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Threads per rank when the user gave none: the host's cores shared among the `local_ranks`
// ranks on it, and no more than the cores this rank is bound to (one, under mpirun's default
// binding for up to 2 ranks; a socket's, shared with other ranks, above that).
inline int default_threads_per_rank(int local_ranks) {
  const int host = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return std::max(1, std::min(cores_available(), host / std::max(1, local_ranks)));
}

}  // namespace andy
