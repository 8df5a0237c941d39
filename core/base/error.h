// Typed errors and the library checks used everywhere in AndyLLM.
// Convention: every failure throws an andy::Error subclass whose message already names
// file:line, the rank and the library's own error text; launch/ mains catch it, log it and
// call MPI_Abort so the other ranks do not hang. Tests use EXPECT_THROW on the subclasses.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace andy {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};
// Bad user input: config file, command-line flag, data file contents.
class ConfigError : public Error {
 public:
  using Error::Error;
};
// Communication failure (MPI, NCCL) or invalid collective arguments.
class CommError : public Error {
 public:
  using Error::Error;
};
// A collective that did not complete within its timeout. The communicator is unusable after.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};
// Files: missing, truncated, corrupt, unwritable.
class IoError : public Error {
 public:
  using Error::Error;
};
// CUDA runtime failures.
class CudaError : public Error {
 public:
  using Error::Error;
};

// The rank this process reports in messages; -1 until the World is initialised.
// Thread-safe (atomic).
int current_rank();
void set_current_rank(int rank);

// "file.cpp:42 [rank 3] " prefix used by the check macros.
std::string where(const char* file, int line);

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace andy

// Throws ErrType with "file:line [rank R] <message parts>" when cond is false.
#define ANDY_CHECK_T(ErrType, cond, ...)                                                 \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      throw ErrType(::andy::where(__FILE__, __LINE__) + ::andy::detail::concat(__VA_ARGS__)); \
    }                                                                                   \
  } while (0)
#define ANDY_CHECK(cond, ...) ANDY_CHECK_T(::andy::Error, cond, __VA_ARGS__)
#define ANDY_THROW(ErrType, ...) \
  throw ErrType(::andy::where(__FILE__, __LINE__) + ::andy::detail::concat(__VA_ARGS__))
