// Small string helpers shared across layers (header-only, no dependencies).
#pragma once

#include <string>

namespace andy {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace andy
