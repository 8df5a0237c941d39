// Number and duration formatting for logs, progress lines and JSON, one set for the whole
// tree. All are pure functions of their arguments (thread-safe).
//
//   format_printf("%.4f", loss)     "2.3026"
//   json_number(nan)                "null" (JSON has no NaN); finite values "%.8g"
//   shortest_number(0.95)           "0.95" (the shortest text that reads back as the same double)
//   format_duration(3725)           "1h02m"; 125 -> "2m05s"; 42 -> "42s"; NaN -> "?"
//   format_si(2.5e9, "B")           "2.50 GB"; 1234 "1.23 kB"; 12 "12 B"
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace andy {

inline std::string format_printf(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

inline std::string json_number(double v) {
  return std::isfinite(v) ? format_printf("%.8g", v) : "null";
}

inline std::string shortest_number(double v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, res.ptr);
}

inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto t = static_cast<long long>(seconds + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", t / 3600, t % 3600 / 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%llds", t);
  return buf;
}

inline std::string format_si(double x, const char* unit) {
  char buf[64];
  if (std::fabs(x) >= 1e12)
    std::snprintf(buf, sizeof buf, "%.2f T%s", x / 1e12, unit);
  else if (std::fabs(x) >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2f G%s", x / 1e9, unit);
  else if (std::fabs(x) >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2f M%s", x / 1e6, unit);
  else if (std::fabs(x) >= 1e3)
    std::snprintf(buf, sizeof buf, "%.2f k%s", x / 1e3, unit);
  else
    std::snprintf(buf, sizeof buf, "%.0f %s", x, unit);
  return buf;
}

}  // namespace andy
