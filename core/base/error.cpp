// Rank bookkeeping for error messages.
#include "core/base/error.h"

#include <atomic>
#include <cstring>

namespace andy {

namespace {
std::atomic<int> g_rank{-1};
}

int current_rank() { return g_rank.load(std::memory_order_relaxed); }
void set_current_rank(int rank) { g_rank.store(rank, std::memory_order_relaxed); }

std::string where(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::string out = base ? base + 1 : file;
  out += ":" + std::to_string(line);
  int r = current_rank();
  if (r >= 0) out += " [rank " + std::to_string(r) + "]";
  return out + " ";
}

}  // namespace andy
