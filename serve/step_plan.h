// What every rank must do in one engine step, decided by rank 0 and broadcast on a dedicated
// control communicator (TensorRT-LLM's leader mode): the KV block copies of swapping, then the
// scheduled sequences as deltas (the new tokens to compute, the blocks added to the sequence's
// table since the last plan, how many of its known blocks it keeps, its context length), the
// rows to sample, and the sequences that ended; or shutdown. Every rank, rank 0 included,
// turns a plan into the packed ForwardBatch through its BlockTables mirror, so their forwards
// and collectives are the same by construction. A prompt's tokens travel once (when computed),
// a block id once (when added).
// When every sampled row is plain greedy (is_plain_greedy), the plan says so and the ranks send
// rank 0 each row's argmax instead of the row (greedy_tokens_to_root).
// Encoded as one int64 vector: [kind, exit_code, greedy, n_out, (dev, host)*, n_in, (host, dev)*,
// n_seq, (seq_id, n_keep, context_len, n_new, block*, n_tokens, token*)*, n_rows, row*,
// n_released, seq_id*].
//
// ControlChannel: rank 0 broadcasts; a worker waiting for the next plan polls a non-blocking
// broadcast with a short sleep, so an idle server never hits a collective timeout and burns
// little CPU. A dead rank ends the job through mpirun (its default on an abnormal exit).
// Thread-safety: one thread per process uses a channel (the engine thread / the worker loop).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/model/forward_batch.h"
#include "parallel/mpi_utils.h"

namespace andy::serve {

struct SequenceDelta {
  int64_t seq_id = 0;
  int64_t n_keep = 0;       // blocks of the known table kept (0: a new or reset table)
  int64_t context_len = 0;  // cached + new tokens after this step
  std::vector<int64_t> new_blocks;  // appended after the kept ones
  std::vector<int64_t> tokens;      // the tokens computed this step
};

struct StepPlan {
  enum Kind : int64_t { kForward = 0, kShutdown = 1 };
  int64_t kind = kForward;
  int64_t exit_code = 0;  // kShutdown: what the workers' command exits with
  std::vector<std::pair<int64_t, int64_t>> swap_out;  // (device block, host block)
  std::vector<std::pair<int64_t, int64_t>> swap_in;   // (host block, device block)
  std::vector<SequenceDelta> seqs;
  std::vector<int64_t> sample_rows;  // rows of the packed batch whose logits are sampled
  bool greedy = false;               // every sampled row is plain greedy: only its argmax goes to rank 0
  std::vector<int64_t> released;     // sequences that ended: their tables are dropped

  std::vector<int64_t> encode() const;
  static StepPlan decode(const std::vector<int64_t>& words);  // throws Error when malformed
};

// Every rank's copy of the block tables of live sequences, kept current by the plans.
class BlockTables {
 public:
  // Drops released tables, applies the deltas, returns the step's packed batch.
  ForwardBatch apply(const StepPlan& plan);
  size_t size() const { return tables_.size(); }

 private:
  std::unordered_map<int64_t, std::vector<int64_t>> tables_;
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
