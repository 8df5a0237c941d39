// Runs a shell command for end-to-end tests; returns its exit code and combined output.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace andy::testing_util {

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

inline CommandResult run_command(const std::string& cmd) {
  CommandResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

inline std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// The andyllm binary and mpirun as configured by CMake (tests/CMakeLists.txt sets these).
inline std::string andyllm_bin() { return env_or("ANDYLLM_BIN", "build/andyllm"); }
inline std::string mpirun(int n) {
  return env_or("ANDYLLM_MPIEXEC", "mpirun") + " -np " + std::to_string(n) + " --oversubscribe ";
}
// Occurrences of `part` in `text`.
inline int count_of(const std::string& text, const std::string& part) {
  int n = 0;
  for (size_t pos = text.find(part); pos != std::string::npos; pos = text.find(part, pos + 1)) ++n;
  return n;
}
inline std::string source_dir() { return env_or("ANDYLLM_SOURCE_DIR", "."); }

}  // namespace andy::testing_util
