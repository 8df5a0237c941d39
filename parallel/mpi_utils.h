// MPI helpers: MPI_CHECK (names file:line, rank and MPI's own error text) and MpiComm,
// an owning wrapper for MPI_Comm (copy deleted, move allowed; never frees MPI_COMM_WORLD).
#pragma once

#include <mpi.h>

#include <functional>
#include <string>

#include "core/base/error.h"

namespace andy {

std::string mpi_error_string(int code);

// Between two polls of something other ranks complete (`poll` counts them from 0): the first
// `spins` back to back (a pause hint only), then yielding the core until `yields`, then
// sleeping 50 µs until `short_sleeps`, then 500 µs, since ranks may share cores.
void poll_backoff(int poll, int spins, int yields, int short_sleeps);

#define MPI_CHECK(call)                                                                   \
  do {                                                                                    \
    int andy_mpi_rc_ = (call);                                                            \
    if (andy_mpi_rc_ != MPI_SUCCESS) {                                                    \
      throw ::andy::CommError(::andy::where(__FILE__, __LINE__) + #call " failed: " +    \
                              ::andy::mpi_error_string(andy_mpi_rc_));                    \
    }                                                                                     \
  } while (0)

// Runs fn on every rank of comm (collective: every rank must call it). If fn throws on any
// rank, every rank throws Agreed<E> with the message of the lowest failing rank, where E is that
// error's family (ConfigError, IoError, CommError, else Error); only that rank has report() set.
// For setup steps that may fail on some ranks only (a file one rank cannot read): the job then
// ends with one message and the same exit code everywhere instead of MPI_Abort. fn itself must
// not run collectives that a failing rank could skip. comm == MPI_COMM_NULL: fn runs alone and
// its error propagates unchanged.
void run_agreed(MPI_Comm comm, const std::function<void()>& fn);

class MpiComm {
 public:
  MpiComm() = default;
  explicit MpiComm(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {}
  ~MpiComm();
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  MpiComm(MpiComm&& o) noexcept : comm_(o.comm_), owned_(o.owned_) { o.comm_ = MPI_COMM_NULL; o.owned_ = false; }
  MpiComm& operator=(MpiComm&& o) noexcept;

  MPI_Comm get() const { return comm_; }
  // Gives up ownership: the handle is returned and never freed here (a thread still uses it).
  MPI_Comm release() {
    owned_ = false;
    return comm_;
  }
  int rank() const;
  int size() const;
  // MPI_Comm_split into a new owned communicator.
  MpiComm split(int color, int key) const;
  // MPI_Comm_dup (collectives on the duplicate never match ours).
  MpiComm dup() const;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owned_ = false;
};

}  // namespace andy
