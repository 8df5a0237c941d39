// Step plans and their broadcast (see step_plan.h).
#include "serve/step_plan.h"

#include <sched.h>

#include <chrono>
#include <thread>

#include "core/base/error.h"

namespace andy::serve {

std::vector<int64_t> StepPlan::encode() const {
  std::vector<int64_t> w;
  w.push_back(kind);
  w.push_back(exit_code);
  w.push_back(greedy ? 1 : 0);
  w.push_back(static_cast<int64_t>(swap_out.size()));
  for (const auto& [a, b] : swap_out) w.insert(w.end(), {a, b});
  w.push_back(static_cast<int64_t>(swap_in.size()));
  for (const auto& [a, b] : swap_in) w.insert(w.end(), {a, b});
  w.push_back(static_cast<int64_t>(seqs.size()));
  for (const SequenceDelta& d : seqs) {
    w.insert(w.end(), {d.seq_id, d.n_keep, d.context_len, static_cast<int64_t>(d.new_blocks.size())});
    w.insert(w.end(), d.new_blocks.begin(), d.new_blocks.end());
    w.push_back(static_cast<int64_t>(d.tokens.size()));
    w.insert(w.end(), d.tokens.begin(), d.tokens.end());
  }
  w.push_back(static_cast<int64_t>(sample_rows.size()));
  w.insert(w.end(), sample_rows.begin(), sample_rows.end());
  w.push_back(static_cast<int64_t>(released.size()));
  w.insert(w.end(), released.begin(), released.end());
  return w;
}

StepPlan StepPlan::decode(const std::vector<int64_t>& w) {
  size_t i = 0;
  auto next = [&]() {
    ANDY_CHECK(i < w.size(), "step plan: truncated at word ", i, " of ", w.size());
    return w[i++];
  };
  auto count = [&]() {
    int64_t n = next();
    ANDY_CHECK(n >= 0 && static_cast<size_t>(n) <= w.size(), "step plan: bad count ", n);
    return n;
  };
  auto list = [&](std::vector<int64_t>& out) {
    for (int64_t n = count(); n > 0; --n) out.push_back(next());
  };
  auto pairs = [&](std::vector<std::pair<int64_t, int64_t>>& out) {
    for (int64_t n = count(); n > 0; --n) {
      const int64_t a = next();
      out.push_back({a, next()});
    }
  };
  StepPlan p;
  p.kind = next();
  p.exit_code = next();
  p.greedy = next() != 0;
  pairs(p.swap_out);
  pairs(p.swap_in);
  for (int64_t n = count(); n > 0; --n) {
    SequenceDelta d;
    d.seq_id = next();
    d.n_keep = next();
    d.context_len = next();
    list(d.new_blocks);
    list(d.tokens);
    p.seqs.push_back(std::move(d));
  }
  list(p.sample_rows);
  list(p.released);
  ANDY_CHECK(i == w.size(), "step plan: ", w.size() - i, " trailing words");
  return p;
}

ForwardBatch BlockTables::apply(const StepPlan& plan) {
  for (int64_t id : plan.released) tables_.erase(id);
  ForwardBatch batch;
  for (const SequenceDelta& d : plan.seqs) {
    std::vector<int64_t>& table = tables_[d.seq_id];
    ANDY_CHECK(d.n_keep >= 0 && d.n_keep <= static_cast<int64_t>(table.size()), "step plan: sequence ",
               d.seq_id, " keeps ", d.n_keep, " of the ", table.size(), " blocks this rank knows");
    table.resize(static_cast<size_t>(d.n_keep));
    table.insert(table.end(), d.new_blocks.begin(), d.new_blocks.end());
    batch.add_sequence(d.tokens, d.context_len, table);
  }
  batch.sample_rows = plan.sample_rows;
  return batch;
}

ControlChannel::ControlChannel(MPI_Comm comm) : comm_(MpiComm(comm, false).dup()) {}

StepPlan ControlChannel::broadcast(const StepPlan& plan) {
  ++plans_;
  if (comm_.size() <= 1) return plan;
  int64_t n = 0;
  std::vector<int64_t> words;
  if (comm_.rank() == 0) {
    words = plan.encode();
    n = static_cast<int64_t>(words.size());
    // Non-blocking like the workers' side: MPI never matches a blocking collective with a
    // non-blocking one.
    MPI_Request req;
    MPI_CHECK(MPI_Ibcast(&n, 1, MPI_INT64_T, 0, comm_.get(), &req));
    MPI_CHECK(MPI_Wait(&req, MPI_STATUS_IGNORE));
  } else {
    // Workers wait here between steps, and idle ones between requests, never with a timeout.
    // For the first 2 ms they poll and yield the core (a busy server's next plan comes within
    // a step's sampling and scheduling: a sleep there would add its granularity to every step,
    // while a yield lets rank 0's HTTP threads run on this core); then with a growing sleep (up
    // to 2 ms) so that an idle server does not spin.
    MPI_Request req;
    MPI_CHECK(MPI_Ibcast(&n, 1, MPI_INT64_T, 0, comm_.get(), &req));
    int done = 0;
    int64_t sleep_us = 0;
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
    while (true) {
      MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (done) break;
      if (std::chrono::steady_clock::now() < spin_until) {
        sched_yield();
        continue;
      }
      if (sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      sleep_us = std::min<int64_t>(2000, sleep_us + 50);
    }
    words.resize(static_cast<size_t>(n));
  }
  MPI_CHECK(MPI_Bcast(words.data(), static_cast<int>(n), MPI_INT64_T, 0, comm_.get()));
  words_ += n;
  return comm_.rank() == 0 ? plan : StepPlan::decode(words);
}

}  // namespace andy::serve
