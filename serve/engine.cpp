// The inference engine (see engine.h).
#include "serve/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/base/error.h"
#include "core/base/failpoint.h"
#include "core/base/torch_compat.h"
#include "core/model/model_config.h"

namespace andy::serve {

struct Engine::Request {
  int64_t id = 0;
  GenerationRequest req;
  UpdateCallback on_update;
  uint64_t seed = 0;
  std::vector<SequenceState*> seqs;  // created so far (the first one forks the others)
  int64_t finished = 0;
  std::chrono::steady_clock::time_point submitted = std::chrono::steady_clock::now();
  double queue_seconds = -1;  // set by the first step that schedules one of its sequences
  std::vector<SampledToken> prompt_scored;  // prompt_logprobs: tokens 1..k of the prompt so far
  bool prompt_scored_sent = false;
  bool forked = false;
  bool aborted = false;
  bool done() const {
    return aborted ? finished == static_cast<int64_t>(seqs.size())
                   : finished == req.params.n;
  }
};

EngineOptions engine_options_from(const Config& cfg, const ModelConfig& model, int tp_size,
                                  at::Device device, at::ScalarType kv_dtype) {
  const ServeConfig& s = cfg.serve;
  EngineOptions o;
  o.block_size = s.block_size;
  o.max_num_seqs = s.max_num_seqs;
  o.max_num_batched_tokens = s.max_num_batched_tokens;
  o.prefix_caching = s.enable_prefix_caching;
  o.seed = s.seed;
  o.max_waiting = s.max_waiting;
  o.max_model_len = s.max_model_len > 0 ? s.max_model_len : model.max_seq_len;
  ANDY_CHECK_T(ConfigError, o.max_model_len <= model.max_seq_len, "[serve] max_model_len = ",
               s.max_model_len, " (", cfg.origin_of("serve.max_model_len"),
               ") exceeds the model's max_seq_len = ", model.max_seq_len);
  const int64_t per_block = 2 * model.n_layer * s.block_size * (model.n_kv_head / tp_size) *
                            head_dim(model) * static_cast<int64_t>(c10::elementSize(kv_dtype));
  const int64_t per_seq = (o.max_model_len + s.block_size - 1) / s.block_size;
  std::string from;
  if (s.num_kv_blocks > 0) {
    o.num_blocks = s.num_kv_blocks;
    from = "[serve] num_kv_blocks = " + std::to_string(s.num_kv_blocks);
  } else if (s.kv_cache_memory > 1) {
    o.num_blocks = static_cast<int64_t>(s.kv_cache_memory) / per_block;
    from = "[serve] kv_cache_memory = " + std::to_string(static_cast<int64_t>(s.kv_cache_memory)) + " bytes";
  } else if (device.is_cuda()) {
    const double frac = s.kv_cache_memory > 0 ? s.kv_cache_memory : 0.9;
    o.num_blocks = static_cast<int64_t>(frac * static_cast<double>(compat::cuda_free_memory(device.index()))) / per_block;
    from = "[serve] kv_cache_memory = " + std::to_string(frac) + " of free GPU memory";
  } else {
    ANDY_CHECK_T(ConfigError, s.kv_cache_memory == 0, "[serve] kv_cache_memory = ", s.kv_cache_memory,
                 " (", cfg.origin_of("serve.kv_cache_memory"), "): a fraction of free memory needs a GPU; "
                 "on CPU give bytes (e.g. 268435456) or 0 for the default");
    o.num_blocks = s.max_num_seqs * per_seq;
    from = "the default (max_num_seqs = " + std::to_string(s.max_num_seqs) + " sequences of " +
           std::to_string(o.max_model_len) + " tokens)";
  }
  ANDY_CHECK_T(ConfigError, o.num_blocks >= per_seq, "KV cache too small: ", from, " gives ",
               o.num_blocks, " blocks of ", s.block_size, " tokens (", per_block,
               " bytes each per rank), fewer than one sequence of max_model_len = ", o.max_model_len,
               " needs (", per_seq, "); raise it or lower [serve] max_model_len");
  o.num_host_blocks = static_cast<int64_t>(s.swap_space * 1024.0 * 1024.0 * 1024.0) / per_block;
  return o;
}

Engine::Engine(const EngineOptions& opts, LlamaForCausalLM model, at::TensorOptions kv_options,
               ControlChannel* channel)
    : opts_(opts),
      model_(std::move(model)),
      channel_(channel),
      cache_(model_->config(), model_->tp_size(), opts.block_size, opts.num_blocks, kv_options),
      blocks_(BlockManagerOptions{opts.num_blocks, opts.block_size, opts.num_host_blocks,
                                  opts.prefix_caching}),
      scheduler_(SchedulerOptions{opts.max_num_seqs, opts.max_num_batched_tokens}, blocks_) {
  if (opts.num_host_blocks > 0) {
    for (int64_t l = 0; l < cache_.n_layer(); ++l) {
      auto host = [&](const at::Tensor& dev) {  // the same block layout, num_host_blocks blocks
        std::vector<int64_t> shape = dev.sizes().vec();
        shape[0] = opts.num_host_blocks;
        return at::zeros(shape, dev.options().device(at::kCPU));
      };
      host_k_.push_back(host(cache_.k(l)));
      host_v_.push_back(host(cache_.v(l)));
    }
  }
  live_.kv_blocks_total = opts.num_blocks;
  stats_ = live_;
}

Engine::~Engine() = default;

int64_t Engine::submit(GenerationRequest request, UpdateCallback on_update) {
  auto r = std::make_unique<Request>();
  r->req = std::move(request);
  r->on_update = std::move(on_update);
  std::lock_guard<std::mutex> lock(mu_);
  r->id = next_request_id_++;
  const int64_t id = r->id;
  inbox_.push_back(std::move(r));
  inbox_cv_.notify_all();
  return id;
}

bool Engine::wait_for_work(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return inbox_cv_.wait_for(lock, timeout, [&] { return !inbox_.empty() || !cancel_inbox_.empty(); });
}

void Engine::cancel(int64_t request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancel_inbox_.push_back(request_id);
  inbox_cv_.notify_all();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

int64_t Engine::num_free_blocks() const { return blocks_.num_available(); }

void Engine::refuse(Request& r, const std::string& why) {
  RequestUpdate u;
  u.request_id = r.id;
  u.finished = u.request_finished = true;
  u.error = why;
  u.prompt_tokens = static_cast<int64_t>(r.req.prompt.size());
  ++live_.requests_refused;
  if (r.on_update) r.on_update(u);
}

void Engine::admit(std::unique_ptr<Request> r) {
  const auto& prompt = r->req.prompt;
  const SamplingParams& p = r->req.params;
  const int64_t vocab = model_->config().vocab_size;
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  std::string err = p.validate(vocab);
  if (err.empty() && prompt.empty()) err = "the prompt is empty (at least one token is needed)";
  for (int32_t t : prompt)
    if (err.empty() && (t < 0 || t >= vocab))
      err = "prompt token id " + std::to_string(t) + " is outside the vocabulary 0.." + std::to_string(vocab - 1);
  if (err.empty() && n_prompt + p.max_tokens > opts_.max_model_len)  // vLLM's wording
    err = "This model's maximum context length is " + std::to_string(opts_.max_model_len) +
          " tokens. However, you requested " + std::to_string(n_prompt + p.max_tokens) + " tokens (" +
          std::to_string(n_prompt) + " in the messages, " + std::to_string(p.max_tokens) +
          " in the completion). Please reduce the length of the messages or completion.";
  if (err.empty() && scheduler_.num_waiting() >= opts_.max_waiting)
    err = "the engine's waiting queue is full (" + std::to_string(opts_.max_waiting) + " requests)";
  if (!err.empty()) {
    refuse(*r, err);
    return;
  }
  r->seed = p.seed >= 0 ? static_cast<uint64_t>(p.seed)
                        : static_cast<uint64_t>(opts_.seed) * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(r->id);
  auto seq = std::make_unique<SequenceState>();
  seq->id = next_seq_id_++;
  seq->request_id = r->id;
  seq->arrival = next_arrival_++;
  seq->tokens = prompt;
  seq->prompt_len = n_prompt;
  seq->max_len = n_prompt + p.max_tokens;
  seq->sampler = std::make_unique<SequenceSampler>(p, r->seed);
  seq->skip_prefix_cache = p.prompt_logprobs >= 0;
  r->seqs.push_back(seq.get());
  scheduler_.add(seq.get());
  seqs_[seq->id] = std::move(seq);
  requests_[r->id] = std::move(r);
}

void Engine::take_inbox() {
  std::vector<std::unique_ptr<Request>> inbox;
  std::vector<int64_t> cancels;
  {
    std::lock_guard<std::mutex> lock(mu_);
    inbox.swap(inbox_);
    cancels.swap(cancel_inbox_);
  }
  for (auto& r : inbox) admit(std::move(r));
  for (int64_t id : cancels) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    r.aborted = true;
    std::vector<SequenceState*> live;
    for (SequenceState* s : r.seqs)
      if (s->status != SequenceState::Status::kFinished) live.push_back(s);
    for (SequenceState* s : live) finish_sequence(s, r, "abort");
  }
}

void Engine::note_first_scheduled(const SchedulerStep& step, std::chrono::steady_clock::time_point now) {
  for (const auto& c : step.chunks) {
    auto it = requests_.find(c.seq->request_id);
    if (it != requests_.end() && it->second->queue_seconds < 0)
      it->second->queue_seconds = std::chrono::duration<double>(now - it->second->submitted).count();
  }
}

StepPlan Engine::plan_of(const SchedulerStep& step) {
  StepPlan plan;
  plan.swap_out = step.swap_out;
  plan.swap_in = step.swap_in;
  plan.released.swap(released_);
  int64_t rows = 0;
  bool greedy = true;  // every sampled row plain greedy, one completion, no prompt logprobs
  for (const auto& c : step.chunks) {
    SequenceState* s = c.seq;
    SequenceDelta d;
    d.seq_id = s->id;
    d.n_keep = s->blocks_sent;
    d.context_len = c.start + c.length;
    d.new_blocks.assign(s->blocks.begin() + s->blocks_sent, s->blocks.end());
    d.tokens.assign(s->tokens.begin() + c.start, s->tokens.begin() + c.start + c.length);
    s->blocks_sent = static_cast<int64_t>(s->blocks.size());
    const int64_t score_rows = prompt_score_rows(c);
    for (int64_t i = 0; i < score_rows; ++i) plan.sample_rows.push_back(rows + i);
    rows += c.length;
    if (c.sample) {
      plan.sample_rows.push_back(rows - 1);
      const SamplingParams& p = requests_.at(s->request_id)->req.params;
      greedy = greedy && is_plain_greedy(p) && p.n == 1;
    }
    greedy = greedy && score_rows == 0;
    plan.seqs.push_back(std::move(d));
  }
  plan.greedy = greedy && !plan.sample_rows.empty();
  return plan;
}

Engine::StepOutput Engine::execute(const StepPlan& plan) {
  at::NoGradGuard no_grad;
  auto ids = [](const std::vector<std::pair<int64_t, int64_t>>& pairs, bool first) {
    std::vector<int64_t> v;
    for (const auto& pr : pairs) v.push_back(first ? pr.first : pr.second);
    return at::tensor(v, at::kLong);
  };
  if (!plan.swap_out.empty()) {
    at::Tensor dev = ids(plan.swap_out, true).to(cache_.k(0).device()), host = ids(plan.swap_out, false);
    for (int64_t l = 0; l < cache_.n_layer(); ++l) {
      host_k_[l].index_copy_(0, host, cache_.k(l).index_select(0, dev).cpu());
      host_v_[l].index_copy_(0, host, cache_.v(l).index_select(0, dev).cpu());
    }
  }
  if (!plan.swap_in.empty()) {
    at::Tensor host = ids(plan.swap_in, true), dev = ids(plan.swap_in, false).to(cache_.k(0).device());
    for (int64_t l = 0; l < cache_.n_layer(); ++l) {
      cache_.k(l).index_copy_(0, dev, host_k_[l].index_select(0, host).to(cache_.k(l).device()));
      cache_.v(l).index_copy_(0, dev, host_v_[l].index_select(0, host).to(cache_.v(l).device()));
    }
  }
  const ForwardBatch batch = tables_.apply(plan);
  if (batch.num_sequences() == 0) return {};
  at::Tensor local = model_->forward_batch(batch, cache_);
  if (batch.sample_rows.empty()) return {};
  // Only TP rank 0, the engine's rank 0 that samples, receives the tokens or the full rows.
  StepOutput out;
  if (plan.greedy) {
    out.greedy_tokens = model_->greedy_tokens_to_root(local);
    return out;
  }
  const at::Tensor full = model_->gather_logits_to_root(local);
  if (full.defined()) out.logits = full.to(at::kFloat).cpu().contiguous();
  return out;
}

bool Engine::step() {
  take_inbox();
  if (scheduler_.idle()) {
    publish_stats();
    return false;
  }
  if (failpoint_fires("engine.step")) throw std::runtime_error("failpoint engine.step");
  auto t0 = std::chrono::steady_clock::now();
  SchedulerStep st = scheduler_.schedule();
  ANDY_CHECK(!st.empty(), "engine: ", scheduler_.num_waiting(), " waiting and ",
             scheduler_.num_running(), " running sequences but nothing could be scheduled (",
             blocks_.num_available(), " of ", blocks_.num_blocks(), " KV blocks available)");
  note_first_scheduled(st, t0);
  const StepPlan plan = plan_of(st);
  channel_->broadcast(plan);
  auto t1 = std::chrono::steady_clock::now();
  const StepOutput out = execute(plan);
  ANDY_CHECK(out.defined() || plan.sample_rows.empty(),
             "engine: its rank 0 is not rank 0 of the model's tensor-parallel group, which alone receives the logits");
  auto t2 = std::chrono::steady_clock::now();
  live_.forward_seconds += std::chrono::duration<double>(t2 - t1).count();
  int64_t prompt_tokens = 0, tokens = 0;
  for (const auto& c : st.chunks) {
    tokens += c.length;
    prompt_tokens += std::max<int64_t>(0, std::min(c.start + c.length, c.seq->prompt_len) - c.start);
  }
  scheduler_.commit(st);
  auto t3 = std::chrono::steady_clock::now();
  process_samples(st, out);
  live_.sample_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t3).count();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  live_.prompt_tokens += prompt_tokens;
  if (prompt_tokens > 0) {
    live_.prefill_step_seconds += dt;
    live_.prefill_step_tokens += tokens;
  } else {
    live_.decode_step_seconds += dt;
    live_.decode_step_tokens += tokens;
  }
  live_.num_preemptions = scheduler_.num_preemptions();
  live_.swapped_out_blocks = scheduler_.num_swapped_out_blocks();
  ++live_.steps;
  publish_stats();
  return true;
}

void Engine::run_until_idle() {
  while (step()) {
  }
}

void Engine::shutdown_workers(int exit_code) {
  StepPlan p;
  p.kind = StepPlan::kShutdown;
  p.exit_code = exit_code;
  channel_->broadcast(p);
}

int Engine::run_worker() {
  while (true) {
    StepPlan p = channel_->broadcast(StepPlan{});
    if (p.kind == StepPlan::kShutdown) return static_cast<int>(p.exit_code);
    execute(p);
  }
}

int64_t Engine::prompt_score_rows(const ScheduledChunk& c) const {
  const SequenceState* s = c.seq;
  if (s->index != 0 || c.start >= s->prompt_len - 1) return 0;
  const Request& r = *requests_.at(s->request_id);
  if (r.req.params.prompt_logprobs < 0 || r.prompt_scored_sent) return 0;
  // Position p's logits score token p + 1; the last prompt position's are sampled instead.
  return std::min(c.start + c.length, s->prompt_len - 1) - c.start;
}

void Engine::process_samples(const SchedulerStep& step, const StepOutput& out) {
  const at::Tensor& logits = out.logits;
  int64_t row = 0;
  for (const auto& c : step.chunks) {
    if (const int64_t n = prompt_score_rows(c); n > 0) {
      Request& r = *requests_.at(c.seq->request_id);
      for (int64_t i = 0; i < n; ++i, ++row) {
        const int64_t p = c.start + i;  // a recomputed (preempted) position is scored once
        if (p != static_cast<int64_t>(r.prompt_scored.size())) continue;
        r.prompt_scored.push_back(score_token(logits[row], c.seq->tokens[p + 1], r.req.params.prompt_logprobs));
      }
    }
    if (!c.sample) continue;
    SequenceState* seq = c.seq;
    Request& r = *requests_.at(seq->request_id);
    if (!out.greedy_tokens.empty()) {  // a greedy plan: the ranks' argmax
      SampledToken t;
      t.token = static_cast<int32_t>(out.greedy_tokens.at(static_cast<size_t>(row++)));
      append_token(seq, t, r);
      continue;
    }
    at::Tensor l = logits[row++];
    if (!r.forked && seq->index == 0 && seq->num_generated() == 0) fork_completions(seq, r, l);
    // The generated tokens are copied out only when a penalty reads them (a copy per token
    // would make a long generation quadratic).
    const SamplingParams& p = r.req.params;
    const bool penalties = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
    const std::vector<int32_t> output =
        penalties ? std::vector<int32_t>(seq->tokens.begin() + seq->prompt_len, seq->tokens.end())
                  : std::vector<int32_t>();
    append_token(seq, seq->sampler->sample(l, r.req.prompt, output), r);
  }
}

void Engine::fork_completions(SequenceState* parent, Request& r, const at::Tensor& row) {
  r.forked = true;
  const int64_t bs = opts_.block_size;
  const int64_t shared = parent->prompt_len / bs;  // full prompt blocks, shared read-only
  for (int64_t k = 1; k < r.req.params.n; ++k) {
    auto child = std::make_unique<SequenceState>();
    child->id = next_seq_id_++;
    child->request_id = r.id;
    child->index = k;
    child->arrival = parent->arrival;
    child->tokens = r.req.prompt;
    child->prompt_len = parent->prompt_len;
    child->max_len = parent->max_len;
    for (int64_t j = 0; j < shared; ++j) {
      blocks_.retain(parent->blocks[j]);
      child->blocks.push_back(parent->blocks[j]);
    }
    child->num_computed = shared * bs;
    child->cached_prompt_tokens = child->num_computed;
    child->sampler = std::make_unique<SequenceSampler>(r.req.params, r.seed + static_cast<uint64_t>(k));
    SequenceState* c = child.get();
    r.seqs.push_back(c);
    seqs_[c->id] = std::move(child);
    scheduler_.add(c);
    append_token(c, c->sampler->sample(row, r.req.prompt, {}), r);
  }
}

void Engine::append_token(SequenceState* seq, const SampledToken& t, Request& r) {
  const SamplingParams& p = r.req.params;
  seq->tokens.push_back(t.token);
  if (p.logprobs >= 0) seq->sampled.push_back(t);
  ++live_.generation_tokens;
  RequestUpdate u;
  u.request_id = r.id;
  u.index = seq->index;
  u.new_tokens = {t.token};
  if (p.logprobs >= 0) u.new_sampled = {t};
  if (p.prompt_logprobs >= 0 && seq->index == 0 && !r.prompt_scored_sent) {
    u.prompt_logprobs = std::move(r.prompt_scored);
    r.prompt_scored_sent = true;
  }
  std::string reason;
  if (!p.ignore_eos && t.token == opts_.eos_id) reason = "stop";
  if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), t.token) != p.stop_token_ids.end())
    reason = "stop";
  if (reason.empty() && (seq->num_generated() >= p.max_tokens ||
                         static_cast<int64_t>(seq->tokens.size()) >= opts_.max_model_len))
    reason = "length";
  if (reason.empty()) {
    u.prompt_tokens = seq->prompt_len;
    u.queue_seconds = r.queue_seconds;
    if (r.on_update) r.on_update(u);
    return;
  }
  complete(seq, r, u, reason);
}

void Engine::finish_sequence(SequenceState* seq, Request& r, const std::string& reason) {
  RequestUpdate u;
  u.request_id = r.id;
  u.index = seq->index;
  complete(seq, r, u, reason);
}

void Engine::complete(SequenceState* seq, Request& r, RequestUpdate& u, const std::string& reason) {
  scheduler_.remove(seq);
  released_.push_back(seq->id);
  seq->finish_reason = reason;
  ++r.finished;
  u.finished = true;
  u.finish_reason = reason;
  u.request_finished = r.done();
  u.prompt_tokens = seq->prompt_len;
  u.cached_prompt_tokens = r.seqs.front()->cached_prompt_tokens;
  u.queue_seconds = r.queue_seconds;
  const int64_t id = r.id;
  if (r.on_update) r.on_update(u);
  if (!u.request_finished) return;
  ++live_.requests_finished;
  for (SequenceState* s : requests_.at(id)->seqs) seqs_.erase(s->id);
  requests_.erase(id);
}

void Engine::publish_stats() {
  live_.num_running = scheduler_.num_running();
  live_.num_waiting = scheduler_.num_waiting();
  live_.num_swapped = scheduler_.num_swapped();
  live_.kv_blocks_used = blocks_.num_used();
  live_.kv_blocks_used_peak = std::max(live_.kv_blocks_used_peak, live_.kv_blocks_used);
  live_.prefix_queries_tokens = blocks_.prefix_queries() * opts_.block_size;
  live_.prefix_hits_tokens = blocks_.prefix_hits() * opts_.block_size;
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = live_;
}

}  // namespace andy::serve
