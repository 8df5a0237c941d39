// Rank-aware logging to stderr: every line says the time, the rank and the level.
// info() prints on rank 0 only (the usual progress lines); warn()/error() and info_all()
// print on every rank. Thread-safe: one mutex serialises lines within a process.
#pragma once

#include <string>

#include "core/base/error.h"

namespace andy::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Default: kInfo; ANDYLLM_LOG_LEVEL=debug|info|warn|error overrides at start-up.
void set_level(Level level);
Level level();

void write(Level level, bool all_ranks, const std::string& msg);

template <typename... Args>
void info(Args&&... args) { write(Level::kInfo, false, detail::concat(args...)); }
template <typename... Args>
void info_all(Args&&... args) { write(Level::kInfo, true, detail::concat(args...)); }
template <typename... Args>
void debug(Args&&... args) { write(Level::kDebug, true, detail::concat(args...)); }
template <typename... Args>
void warn(Args&&... args) { write(Level::kWarn, true, detail::concat(args...)); }
template <typename... Args>
void error(Args&&... args) { write(Level::kError, true, detail::concat(args...)); }

}  // namespace andy::log
