// The inference engine: continuous batching over a paged KV cache, tensor-parallel through step
// plans. Rank 0 (the leader) owns the requests, the scheduler, the block manager and sampling;
// every rank (workers included) owns its shard of the model and its slice of the KV cache.
//
// Threads (llama.cpp server's queue shape): one engine thread owns the model, the KV cache, the
// scheduler and the communicators; it alone calls step() / run_until_idle(). Any other thread
// may call submit() and cancel(): they only post to an inbox under a mutex. Updates are
// delivered by calling the request's callback on the engine thread: it must return quickly
// (copy the update into a queue of its own).
//
// One leader step:
//   1. take new requests and cancellations from the inbox (a request that can never be served
//      gets its error at once);
//   2. schedule (scheduler.h): chunks to compute, swaps, preemptions;
//   3. broadcast the step plan; every rank copies swapped blocks and runs forward_batch;
//   4. gather the sampled rows' logits; sample; append tokens, fork n > 1 completions after
//      the prompt, finish on eos / stop ids / max_tokens / max_model_len;
//   5. deliver updates; free the blocks of finished sequences.
// Workers loop in run_worker() until the leader broadcasts shutdown (shutdown_workers()).
//
//   Engine engine(opts, model, cache_options, &channel);
//   if (rank == 0) { engine.submit(req, on_update); engine.run_until_idle(); engine.shutdown_workers(); }
//   else engine.run_worker();
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/model/kv_cache.h"
#include "core/model/llama.h"
#include "serve/block_manager.h"
#include "serve/sampler.h"
#include "serve/scheduler.h"
#include "serve/step_plan.h"

namespace andy::serve {

struct EngineOptions {
  int64_t block_size = 16;
  int64_t num_blocks = 0;        // device KV blocks per rank
  int64_t num_host_blocks = 0;   // swap space in blocks per rank
  int64_t max_num_seqs = 32;
  int64_t max_num_batched_tokens = 512;
  int64_t max_model_len = 0;     // prompt + completion tokens at most
  bool prefix_caching = true;
  int64_t seed = 0;              // seed of requests that give none (mixed with the request id)
  int eos_id = 3;
  int64_t max_waiting = 1 << 30; // requests queued at most (more are refused)
};

// Engine options from [serve] for `model` split over `tp_size` ranks on `device`: the KV pool
// sized from serve.num_kv_blocks, serve.kv_cache_memory or the default. Throws ConfigError
// naming the keys when the pool cannot hold one sequence of max_model_len.
EngineOptions engine_options_from(const Config& cfg, const ModelConfig& model, int tp_size,
                                  at::Device device, at::ScalarType kv_dtype);

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams params;
};

// One update of one completion of a request (delivered on the engine thread).
struct RequestUpdate {
  int64_t request_id = 0;
  int64_t index = 0;                       // completion index (0 .. n-1)
  std::vector<int32_t> new_tokens;         // tokens generated since the last update
  std::vector<SampledToken> new_sampled;   // their logprobs (when asked)
  std::vector<SampledToken> prompt_logprobs;  // prompt tokens 1.. scored (prompt_logprobs asked;
                                              // in the first update of completion 0 only)
  bool finished = false;                   // this completion is done
  bool request_finished = false;           // every completion of the request is done
  std::string finish_reason;               // "stop", "length", "abort" (finished only)
  std::string error;                       // the request was refused (nothing generated)
  int64_t prompt_tokens = 0;
  int64_t cached_prompt_tokens = 0;        // prompt tokens served from the prefix cache
  double queue_seconds = -1;               // submit() to the first step that computed it (-1: not yet)
};
using UpdateCallback = std::function<void(const RequestUpdate&)>;

struct EngineStats {
  int64_t steps = 0;
  int64_t num_running = 0, num_waiting = 0, num_swapped = 0;
  int64_t kv_blocks_total = 0, kv_blocks_used = 0, kv_blocks_used_peak = 0;
  int64_t num_preemptions = 0;
  int64_t swapped_out_blocks = 0;  // KV blocks copied to host memory by swap preemptions
  int64_t prefix_queries_tokens = 0, prefix_hits_tokens = 0;  // prompt tokens looked up / found
  int64_t prompt_tokens = 0, generation_tokens = 0;           // computed prompt, sampled tokens
  int64_t requests_finished = 0, requests_refused = 0;
  // Step time split: steps that computed prompt tokens, and decode-only steps.
  double prefill_step_seconds = 0, decode_step_seconds = 0;
  double forward_seconds = 0, sample_seconds = 0;  // of which: forward + logits gather, sampling
  int64_t prefill_step_tokens = 0, decode_step_tokens = 0;
};

class Engine {
 public:
  // `model` and `channel` must outlive the engine; `kv_options`: dtype/device of the cache.
  Engine(const EngineOptions& opts, LlamaForCausalLM model, at::TensorOptions kv_options,
         ControlChannel* channel);
  ~Engine();

  // ---- any thread (leader rank) -------------------------------------------------------------
  // Queues a request; returns its id. Errors arrive through the callback.
  int64_t submit(GenerationRequest request, UpdateCallback on_update);
  void cancel(int64_t request_id);
  // A snapshot of the counters (updated by the engine thread after each step).
  EngineStats stats() const;
  const EngineOptions& options() const { return opts_; }

  // ---- engine thread only ---------------------------------------------------------------------
  // One leader step; false when there was nothing to do.
  bool step();
  // Steps until no request is queued, waiting, running or swapped.
  void run_until_idle();
  // Blocks until a request or a cancellation is posted, or `timeout` passes; true when there
  // is something to do. For a serving loop: while (!stop) if (!step()) wait_for_work(100ms);
  bool wait_for_work(std::chrono::milliseconds timeout);
  // Tells the workers to return from run_worker() with `exit_code`. Leader only, once.
  void shutdown_workers(int exit_code = 0);
  // Workers: runs the leader's plans until shutdown; returns the leader's exit code.
  int run_worker();
  // Blocks of the pool not referenced by any sequence (all of them when idle, by design).
  int64_t num_free_blocks() const;

 private:
  struct Request;
  void take_inbox();
  void admit(std::unique_ptr<Request> r);
  void refuse(Request& r, const std::string& why);
  // The step as deltas for every rank's BlockTables (marks the blocks as sent), flagged greedy
  // when every row it samples is plain greedy (is_plain_greedy, one completion, no prompt
  // logprobs).
  StepPlan plan_of(const SchedulerStep& step);
  // Rows of a chunk whose logits score the next prompt token (prompt logprobs not yet computed).
  int64_t prompt_score_rows(const ScheduledChunk& c) const;
  // Records the queue time of the requests scheduled for the first time in `step`.
  void note_first_scheduled(const SchedulerStep& step, std::chrono::steady_clock::time_point now);
  // What rank 0 samples from: the full-vocabulary logits of the sampled rows, or, for a greedy
  // plan, their tokens.
  struct StepOutput {
    at::Tensor logits;
    std::vector<int64_t> greedy_tokens;
    bool defined() const { return logits.defined() || !greedy_tokens.empty(); }
  };
  // Swaps and forward on this rank; rank 0 gets the step's output (every rank takes part in the
  // gather).
  StepOutput execute(const StepPlan& plan);
  void process_samples(const SchedulerStep& step, const StepOutput& out);
  void append_token(SequenceState* seq, const SampledToken& t, Request& r);
  void fork_completions(SequenceState* parent, Request& r, const at::Tensor& row);
  void finish_sequence(SequenceState* seq, Request& r, const std::string& reason);
  // Ends `seq` with `reason`, delivers `u` (marked finished) and drops a finished request.
  void complete(SequenceState* seq, Request& r, RequestUpdate& u, const std::string& reason);
  void publish_stats();

  EngineOptions opts_;
  LlamaForCausalLM model_;
  ControlChannel* channel_;
  KvCache cache_;
  std::vector<at::Tensor> host_k_, host_v_;  // swap space, per layer
  BlockManager blocks_;
  Scheduler scheduler_;
  BlockTables tables_;             // every rank: the block tables as the plans built them
  std::vector<int64_t> released_;  // leader: sequences ended since the last plan
  std::map<int64_t, std::unique_ptr<Request>> requests_;
  std::map<int64_t, std::unique_ptr<SequenceState>> seqs_;
  int64_t next_seq_id_ = 0, next_arrival_ = 0;

  mutable std::mutex mu_;  // guards the inbox, next_request_id_ and stats_
  std::condition_variable inbox_cv_;
  std::vector<std::unique_ptr<Request>> inbox_;
  std::vector<int64_t> cancel_inbox_;
  int64_t next_request_id_ = 1;
  EngineStats stats_;
  EngineStats live_;  // engine thread's counters, copied to stats_ after each step
};

}  // namespace andy::serve
