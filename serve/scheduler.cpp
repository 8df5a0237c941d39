// The continuous-batching scheduler (see scheduler.h).
#include "serve/scheduler.h"

#include <algorithm>

#include "core/base/error.h"

namespace andy::serve {

namespace {

bool by_arrival(const SequenceState* a, const SequenceState* b) {
  return a->arrival != b->arrival ? a->arrival < b->arrival : a->id < b->id;
}

template <typename C>
void insert_by_arrival(C& c, SequenceState* s) {
  c.insert(std::upper_bound(c.begin(), c.end(), s, by_arrival), s);
}

template <typename C>
void erase_value(C& c, SequenceState* s) {
  c.erase(std::remove(c.begin(), c.end(), s), c.end());
}

int64_t pending_tokens(const SequenceState* s) {
  return static_cast<int64_t>(s->tokens.size()) - s->num_computed;
}

}  // namespace

Scheduler::Scheduler(const SchedulerOptions& opts, BlockManager& blocks)
    : opts_(opts), blocks_(blocks) {}

void Scheduler::add(SequenceState* seq) {
  seq->status = SequenceState::Status::kWaiting;
  insert_by_arrival(waiting_, seq);
}

void Scheduler::free_blocks(SequenceState* seq) {
  for (int64_t b : seq->blocks) blocks_.release(b);
  seq->blocks.clear();
  seq->blocks_sent = 0;
  seq->num_registered = 0;
  seq->last_hash = 0;
}

void Scheduler::remove(SequenceState* seq) {
  erase_value(running_, seq);
  erase_value(waiting_, seq);
  erase_value(swapped_, seq);
  free_blocks(seq);
  for (int64_t h : seq->host_blocks) blocks_.release_host(h);
  seq->host_blocks.clear();
  seq->status = SequenceState::Status::kFinished;
}

bool Scheduler::grow(SequenceState* seq, int64_t tokens) {
  const int64_t bs = blocks_.block_size();
  const int64_t need = (tokens + bs - 1) / bs - static_cast<int64_t>(seq->blocks.size());
  if (need <= 0) return true;
  if (blocks_.num_available() < need) return false;
  for (int64_t i = 0; i < need; ++i) seq->blocks.push_back(blocks_.allocate());
  return true;
}

void Scheduler::preempt(SequenceState* victim, SchedulerStep& step) {
  erase_value(running_, victim);
  ++num_preemptions_;
  ++step.num_preempted;
  const int64_t n = static_cast<int64_t>(victim->blocks.size());
  if (n > 0 && blocks_.num_host_free() >= n) {
    // Swap: the copies run before this step's forward, so the freed blocks may be reused now.
    for (int64_t b : victim->blocks) {
      const int64_t h = blocks_.allocate_host();
      step.swap_out.push_back({b, h});
      ++num_swapped_out_blocks_;
      victim->host_blocks.push_back(h);
    }
    free_blocks(victim);
    victim->status = SequenceState::Status::kSwapped;
    insert_by_arrival(swapped_, victim);
    return;
  }
  // Recompute: everything computed so far is dropped; the tokens stay.
  free_blocks(victim);
  victim->num_computed = 0;
  victim->status = SequenceState::Status::kWaiting;
  waiting_.push_front(victim);
}

bool Scheduler::swap_in(SequenceState* seq, int64_t n_new, SchedulerStep& step) {
  const int64_t bs = blocks_.block_size();
  const int64_t held = static_cast<int64_t>(seq->host_blocks.size());
  // Room for its blocks and for this step's tokens: a decode's one, or a prefill chunk's many
  // (a sequence swapped out in the middle of its prompt).
  const int64_t total = std::max(held, (seq->num_computed + n_new + bs - 1) / bs);
  if (blocks_.num_available() < total) return false;
  for (int64_t h : seq->host_blocks) {
    const int64_t b = blocks_.allocate();
    step.swap_in.push_back({h, b});
    seq->blocks.push_back(b);
  }
  // The host blocks are returned after this step's copies (commit), not reused within it.
  seq->status = SequenceState::Status::kRunning;
  return true;
}

void Scheduler::lookup_prefix(SequenceState* seq) {
  const int64_t bs = blocks_.block_size();
  const int64_t full = (static_cast<int64_t>(seq->tokens.size()) - 1) / bs;  // >= 1 token left
  uint64_t prev = 0;
  for (int64_t j = 0; j < full; ++j) {
    const uint64_t h = BlockManager::hash_block(prev, seq->tokens.data() + j * bs, bs);
    const int64_t b = blocks_.lookup(h);
    if (b < 0) break;
    seq->blocks.push_back(b);
    prev = h;
  }
  seq->num_registered = static_cast<int64_t>(seq->blocks.size());
  seq->last_hash = prev;
  seq->num_computed = seq->num_registered * bs;
  seq->cached_prompt_tokens = std::min(seq->num_computed, seq->prompt_len);
}

SchedulerStep Scheduler::schedule() {
  SchedulerStep step;
  int64_t budget = opts_.max_num_batched_tokens;
  auto plan = [&](SequenceState* s, int64_t n) {
    step.chunks.push_back({s, s->num_computed, n, s->num_computed + n == static_cast<int64_t>(s->tokens.size())});
    budget -= n;
  };
  // 1. Running sequences, oldest first; the newest give way when blocks run out.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    SequenceState* s = running_[i];
    const int64_t n = std::min(pending_tokens(s), budget);
    bool self_preempted = false;
    while (!grow(s, s->num_computed + n)) {
      SequenceState* victim = running_.back();
      preempt(victim, step);
      if (victim == s) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    plan(s, n);
    ++i;
  }
  if (step.num_preempted > 0) return step;
  // 2. Swapped sequences come back, oldest first.
  while (!swapped_.empty() && budget > 0 && num_running() < opts_.max_num_seqs) {
    SequenceState* s = swapped_.front();
    const int64_t n = std::min(pending_tokens(s), budget);
    if (!swap_in(s, n, step)) break;
    swapped_.pop_front();
    insert_by_arrival(running_, s);
    ANDY_CHECK(grow(s, s->num_computed + n), "scheduler: swap-in reserved too few blocks");
    plan(s, n);
  }
  // 3. Waiting sequences, in arrival order.
  while (!waiting_.empty() && budget > 0 && num_running() < opts_.max_num_seqs) {
    SequenceState* s = waiting_.front();
    if (s->num_computed == 0 && s->blocks.empty() && !s->skip_prefix_cache) lookup_prefix(s);
    const int64_t n = std::min(pending_tokens(s), budget);
    if (!grow(s, s->num_computed + n)) {
      free_blocks(s);  // give back prefix-cache hits while it waits
      s->num_computed = 0;
      s->cached_prompt_tokens = 0;
      break;
    }
    waiting_.pop_front();
    s->status = SequenceState::Status::kRunning;
    insert_by_arrival(running_, s);
    plan(s, n);
  }
  return step;
}

void Scheduler::commit(const SchedulerStep& step) {
  for (const auto& [host, dev] : step.swap_in) {
    (void)dev;
    blocks_.release_host(host);
  }
  for (const auto& c : step.chunks) {
    SequenceState* s = c.seq;
    if (!s->host_blocks.empty() && s->status == SequenceState::Status::kRunning) s->host_blocks.clear();
    s->num_computed = c.start + c.length;
    const int64_t bs = blocks_.block_size();
    while ((s->num_registered + 1) * bs <= s->num_computed) {
      const uint64_t h =
          BlockManager::hash_block(s->last_hash, s->tokens.data() + s->num_registered * bs, bs);
      blocks_.register_full(s->blocks[s->num_registered], h);
      s->last_hash = h;
      ++s->num_registered;
    }
  }
}

}  // namespace andy::serve
