// Continuous batching (vLLM's scheduler, chunked prefill always on). Each engine step gets a
// token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs):
//   1. running sequences first, in arrival order: a decode takes one token, an unfinished
//      prefill its next chunk (whatever the budget leaves). When the KV pool has no block for
//      one, the latest-arrived running sequence is preempted: swapped to host memory when the
//      host pool has room (swap_space > 0), otherwise freed to be recomputed later.
//   2. swapped sequences come back (oldest first) when no preemption happened this step.
//   3. waiting sequences are admitted in arrival order while budget, sequence cap and blocks
//      allow; their prompt's full blocks are first looked up in the prefix cache (at least one
//      token is always computed, for the logits).
// A sequence is sampled in the step that computes its last known token. Blocks become
// prefix-cacheable (registered by hash) as they fill. The scheduler only plans: the engine runs
// the forward and then calls commit(). Not thread-safe: the engine thread owns it.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "serve/block_manager.h"
#include "serve/sampler.h"

namespace andy::serve {

struct SequenceState {
  enum class Status { kWaiting, kRunning, kSwapped, kFinished };
  int64_t id = 0;          // unique over the engine's life
  int64_t request_id = 0;
  int64_t index = 0;       // completion index within the request (n > 1)
  int64_t arrival = 0;     // admission order (ties: id)
  std::vector<int32_t> tokens;  // prompt + generated
  int64_t prompt_len = 0;
  int64_t max_len = 0;     // prompt_len + max_tokens (capped by max_model_len)
  int64_t num_computed = 0;     // tokens whose K/V are in the cache
  std::vector<int64_t> blocks;       // device blocks, in token order
  std::vector<int64_t> host_blocks;  // while swapped
  int64_t blocks_sent = 0;           // leading blocks the workers' tables already hold
  int64_t num_registered = 0;        // leading full blocks registered in the prefix cache
  uint64_t last_hash = 0;            // hash of the last registered block
  int64_t cached_prompt_tokens = 0;  // prompt tokens found in the prefix cache
  Status status = Status::kWaiting;
  std::unique_ptr<SequenceSampler> sampler;
  std::vector<SampledToken> sampled;  // one per generated token (logprobs)
  std::string finish_reason;          // "stop", "length", "abort" once finished
  bool skip_prefix_cache = false;     // compute every prompt position (prompt logprobs need them)
  int64_t num_generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
};

struct SchedulerOptions {
  int64_t max_num_seqs = 32;
  int64_t max_num_batched_tokens = 512;
};

struct ScheduledChunk {
  SequenceState* seq = nullptr;
  int64_t start = 0;   // first position computed (== seq->num_computed at planning)
  int64_t length = 0;  // tokens computed this step
  bool sample = false; // the chunk reaches the sequence's last token
};

struct SchedulerStep {
  std::vector<ScheduledChunk> chunks;
  std::vector<std::pair<int64_t, int64_t>> swap_out;  // (device block, host block)
  std::vector<std::pair<int64_t, int64_t>> swap_in;   // (host block, device block)
  int64_t num_preempted = 0;
  bool empty() const { return chunks.empty() && swap_out.empty() && swap_in.empty(); }
};

class Scheduler {
 public:
  // `blocks` must outlive the scheduler.
  Scheduler(const SchedulerOptions& opts, BlockManager& blocks);

  void add(SequenceState* seq);  // a new sequence: waits for admission
  // A finished or aborted sequence leaves every queue and frees its blocks.
  void remove(SequenceState* seq);
  SchedulerStep schedule();
  // After the forward: advances num_computed of every chunk and registers newly full blocks.
  void commit(const SchedulerStep& step);

  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_swapped() const { return static_cast<int64_t>(swapped_.size()); }
  int64_t num_preemptions() const { return num_preemptions_; }
  int64_t num_swapped_out_blocks() const { return num_swapped_out_blocks_; }
  bool idle() const { return running_.empty() && waiting_.empty() && swapped_.empty(); }
  BlockManager& blocks() { return blocks_; }

 private:
  // Blocks for `seq` to hold `tokens` tokens; false (nothing allocated) when the pool is short.
  bool grow(SequenceState* seq, int64_t tokens);
  void free_blocks(SequenceState* seq);
  // Frees (recompute) or swaps out `victim`; appends swap pairs to `step`.
  void preempt(SequenceState* victim, SchedulerStep& step);
  // Brings a swapped sequence back with room for n_new tokens of this step; false if blocks lack.
  bool swap_in(SequenceState* seq, int64_t n_new, SchedulerStep& step);
  void lookup_prefix(SequenceState* seq);

  SchedulerOptions opts_;
  BlockManager& blocks_;
  std::vector<SequenceState*> running_;  // arrival order
  std::deque<SequenceState*> waiting_;   // arrival order (preempted ones go back in front)
  std::deque<SequenceState*> swapped_;
  int64_t num_preemptions_ = 0;
  int64_t num_swapped_out_blocks_ = 0;
};

}  // namespace andy::serve
