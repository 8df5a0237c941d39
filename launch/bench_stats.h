// What the latency benchmarks (bench generate, bench serve) share: percentiles of a sample and
// the --concurrency list.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace andy {

struct Percentiles {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
};
// Mean and nearest-rank percentiles; zeros for an empty sample.
Percentiles percentiles(std::vector<double> v);
// "1,8,32" -> {1, 8, 32}; a ConfigError naming --`flag` for anything but positive integers.
std::vector<int64_t> parse_positive_list(const std::string& text, const std::string& flag);

}  // namespace andy
