// What every rank must do in one engine step, decided by rank 0 and broadcast on a dedicated
// control communicator (TensorRT-LLM's leader mode): the KV block copies of swapping, then the
// packed forward batch (tokens, per-sequence context lengths, block tables, sampled rows), or
// shutdown. Workers run exactly the plans they receive, so their collectives match rank 0's.
// Encoded as one int64 vector: [kind, exit_code, n_out, (dev, host)*, n_in, (host, dev)*, n_seq,
// (query_len, context_len, n_blocks, block*, token*)*, n_rows, row*].
//
// ControlChannel: rank 0 broadcasts; a worker waiting for the next plan polls a non-blocking
// broadcast with a short sleep, so an idle server never hits a collective timeout and burns
// little CPU. A dead rank ends the job through mpirun (its default on an abnormal exit).
// Thread-safety: one thread per process uses a channel (the engine thread / the worker loop).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "core/model/forward_batch.h"
#include "parallel/mpi_utils.h"

namespace andy::serve {

struct StepPlan {
  enum Kind : int64_t { kForward = 0, kShutdown = 1 };
  int64_t kind = kForward;
  int64_t exit_code = 0;  // kShutdown: what the workers' command exits with
  std::vector<std::pair<int64_t, int64_t>> swap_out;  // (device block, host block)
  std::vector<std::pair<int64_t, int64_t>> swap_in;   // (host block, device block)
  ForwardBatch batch;

  std::vector<int64_t> encode() const;
  static StepPlan decode(const std::vector<int64_t>& words);  // throws Error when malformed
};

class ControlChannel {
 public:
  // Duplicates `comm` (plans never match another collective). Collective over `comm`.
  explicit ControlChannel(MPI_Comm comm);
  int rank() const { return comm_.rank(); }
  int size() const { return comm_.size(); }
  // Rank 0: sends `plan` to every rank. Other ranks: waits (no timeout) and returns rank 0's.
  StepPlan broadcast(const StepPlan& plan);
  // Plans sent or received so far, and the int64 words they took.
  int64_t plans() const { return plans_; }
  int64_t words() const { return words_; }

 private:
  MpiComm comm_;
  int64_t plans_ = 0, words_ = 0;
};

}  // namespace andy::serve
