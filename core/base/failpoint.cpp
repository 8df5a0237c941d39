#include "core/base/failpoint.h"

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

namespace andy {

namespace {

struct Armed {
  std::mutex mu;
  std::map<std::string, int64_t> left;  // firings left; -1: always
};

Armed& armed() {
  static Armed* a = [] {
    auto* r = new Armed;  // never destroyed: failpoints may be checked during exit
    const char* env = std::getenv("ANDYLLM_FAILPOINTS");
    std::stringstream ss(env ? env : "");
    std::string item;
    while (std::getline(ss, item, ',')) {
      if (item.empty()) continue;
      const size_t colon = item.find(':');
      const std::string name = item.substr(0, colon);
      r->left[name] = colon == std::string::npos ? -1 : std::strtoll(item.c_str() + colon + 1, nullptr, 10);
    }
    return r;
  }();
  return *a;
}

}  // namespace

bool failpoint_fires(const char* name) {
  Armed& a = armed();
  // The names never change after the first call (only their counts do, under the lock): with
  // none armed, the hot paths that check failpoints take no lock.
  if (a.left.empty()) return false;
  std::lock_guard<std::mutex> lock(a.mu);
  auto it = a.left.find(name);
  if (it == a.left.end() || it->second == 0) return false;
  if (it->second > 0) --it->second;
  return true;
}

}  // namespace andy
