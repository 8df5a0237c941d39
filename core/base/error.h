// Typed errors and the library checks used everywhere in AndyLLM.
// Convention: every failure throws an andy::Error subclass whose message already names
// file:line, the rank and the library's own error text; launch/ mains catch it, log it and
// call MPI_Abort so the other ranks do not hang. Tests use EXPECT_THROW on the subclasses.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// A failure every rank of the job knows about: the ranks agreed on it (run_agreed in
// parallel/mpi_utils.h, the checkpoint code), so main exits with exit_code() on every rank
// without MPI_Abort, and only ranks with report() print the message (once, not once per rank).
// Caught as AgreedFailure; thrown as Agreed<E>, which is also an E (ConfigError, IoError ...).
class AgreedFailure {
 public:
  AgreedFailure(bool report, int exit_code) : report_(report), exit_code_(exit_code) {}
  virtual ~AgreedFailure() = default;
  bool report() const { return report_; }
  int exit_code() const { return exit_code_; }
  virtual const char* message() const = 0;

 private:
  bool report_;
  int exit_code_;
};
// Exit code 2 for ConfigError (bad input), 1 otherwise.
template <typename E>
class Agreed : public E, public AgreedFailure {
 public:
  Agreed(const std::string& what, bool report)
      : E(what), AgreedFailure(report, std::is_base_of_v<ConfigError, E> ? 2 : 1) {}
  const char* message() const override { return this->what(); }
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
// Bad user input (a flag, a path, a file the user named): ConfigError (exit 2) whose message
// names the input itself, without our source location.
#define ANDY_USER_CHECK(cond, ...)                                              \
  do {                                                                          \
    if (!(cond)) throw ::andy::ConfigError(::andy::detail::concat(__VA_ARGS__)); \
  } while (0)
#define ANDY_THROW(ErrType, ...) \
  throw ErrType(::andy::where(__FILE__, __LINE__) + ::andy::detail::concat(__VA_ARGS__))
