// Rank-prefixed log lines: "2026-11-24 11:03:25 [rank 0] info: message".
#include "core/base/logging.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>

namespace andy::log {

namespace {
Level initial_level() {
  const char* env = std::getenv("ANDYLLM_LOG_LEVEL");
  if (!env) return Level::kInfo;
  if (!std::strcmp(env, "debug")) return Level::kDebug;
  if (!std::strcmp(env, "warn")) return Level::kWarn;
  if (!std::strcmp(env, "error")) return Level::kError;
  return Level::kInfo;
}
std::atomic<int> g_level{static_cast<int>(initial_level())};
std::mutex g_mutex;
const char* name(Level l) {
  switch (l) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warning";
    case Level::kError: return "error";
  }
  return "?";
}
}  // namespace

void set_level(Level level) { g_level.store(static_cast<int>(level)); }
Level level() { return static_cast<Level>(g_level.load()); }

void write(Level lvl, bool all_ranks, const std::string& msg) {
  if (static_cast<int>(lvl) < g_level.load()) return;
  int rank = current_rank();
  if (!all_ranks && rank > 0) return;
  auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  localtime_r(&now, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S", &tm);
  std::string rank_s = rank >= 0 ? "[rank " + std::to_string(rank) + "] " : "";
  std::lock_guard<std::mutex> lock(g_mutex);
  std::fprintf(stderr, "%s %s%s: %s\n", ts, rank_s.c_str(), name(lvl), msg.c_str());
  std::fflush(stderr);
}

}  // namespace andy::log
