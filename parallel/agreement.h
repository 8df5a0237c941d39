// The one protocol by which ranks agree on a failure: every rank says whether it failed; the
// lowest failing rank's error family and message reach every rank, which all throw
// Agreed<family>(message) with report() set on that rank only (main prints it once and every
// rank exits with the same code, without MPI_Abort). Two transports carry it: a raw MPI
// communicator (run_agreed, parallel/mpi_utils.h: setup steps, before any Communicator exists)
// and a Communicator (agree_on_error below: the trainer's checkpoints, where the group may be
// NCCL or a sub-grid).
//
// Collective over the transport: every rank must call it, in the same order as its other
// collectives.
//
//   agree_on_error(grid.world.get(), device, local_error);   // throws Agreed<IoError> if any failed
#pragma once

#include <ATen/ATen.h>

#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace andy {

// An error's family, as carried between ranks.
enum class FailureKind : int32_t { kNone = 0, kConfig = 1, kIo = 2, kComm = 3, kOther = 4 };
FailureKind failure_kind_of(const std::exception& e);

// What a transport must provide: MIN of one int over the ranks, and the ints of `root` sent to
// every rank (`values` is resized on the receivers).
struct AgreementTransport {
  int rank = 0, size = 1;
  std::function<int(int)> min_over_ranks;
  std::function<void(std::vector<int32_t>& values, int root)> broadcast_ints;
};

// Agrees, then throws Agreed<family> on every rank when any rank failed (kind != kNone); returns
// normally when none did. `on_failure` runs on every rank just before the throw (cleanup).
void agree_or_throw_first_failure(const AgreementTransport& t, FailureKind kind, const std::string& message,
                                  const std::function<void()>& on_failure = {});

// The transport over a Communicator (null or size 1: a single rank). With NCCL the few ints go
// through `device`.
AgreementTransport communicator_transport(Communicator* c, at::Device device);

// Collective over `c`: throws Agreed<IoError> with the lowest failing rank's `local_error` on
// every rank when any rank's is non-empty. `on_failure` as above.
void agree_on_error(Communicator* c, at::Device device, const std::string& local_error,
                    const std::function<void()>& on_failure = {});

// All-reduce / broadcast of a small host tensor over `c` (null or size 1: nothing); with the
// NCCL backend it travels through `device` (NCCL moves GPU memory only).
void all_reduce_host(Communicator* c, at::Tensor& t, ReduceOp op, at::Device device);
void broadcast_host(Communicator* c, at::Tensor& t, int root, at::Device device);

}  // namespace andy
