#include "launch/bench_stats.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "core/base/error.h"

namespace andy {

Percentiles percentiles(std::vector<double> v) {
  Percentiles p;
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  p.mean = sum / static_cast<double>(v.size());
  auto at = [&](double q) { return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))]; };
  p.p50 = at(0.5);
  p.p90 = at(0.9);
  p.p99 = at(0.99);
  return p;
}

std::vector<int64_t> parse_positive_list(const std::string& text, const std::string& flag) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      int64_t v = std::stoll(item, &used);
      if (used != item.size() || v < 1) throw std::invalid_argument(item);
      out.push_back(v);
    } catch (const std::exception&) {
      throw ConfigError("--" + flag + " " + text + ": expected positive integers separated by commas (e.g. 1,8,32)");
    }
  }
  ANDY_USER_CHECK(!out.empty(), "--", flag, ": empty list");
  return out;
}

}  // namespace andy
