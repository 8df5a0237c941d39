// Step plans and their broadcast (see step_plan.h).
#include "serve/step_plan.h"

#include <chrono>
#include <thread>

#include "core/base/error.h"

namespace andy::serve {

std::vector<int64_t> StepPlan::encode() const {
  std::vector<int64_t> w;
  w.reserve(8 + 2 * (swap_out.size() + swap_in.size()) + batch.tokens.size() * 2 +
            batch.sample_rows.size());
  w.push_back(kind);
  w.push_back(exit_code);
  w.push_back(static_cast<int64_t>(swap_out.size()));
  for (const auto& [a, b] : swap_out) w.insert(w.end(), {a, b});
  w.push_back(static_cast<int64_t>(swap_in.size()));
  for (const auto& [a, b] : swap_in) w.insert(w.end(), {a, b});
  w.push_back(batch.num_sequences());
  for (int64_t s = 0; s < batch.num_sequences(); ++s) {
    w.push_back(batch.query_len(s));
    w.push_back(batch.context_len[s]);
    w.push_back(static_cast<int64_t>(batch.block_tables[s].size()));
    w.insert(w.end(), batch.block_tables[s].begin(), batch.block_tables[s].end());
    w.insert(w.end(), batch.tokens.begin() + batch.query_start[s],
             batch.tokens.begin() + batch.query_start[s + 1]);
  }
  w.push_back(static_cast<int64_t>(batch.sample_rows.size()));
  w.insert(w.end(), batch.sample_rows.begin(), batch.sample_rows.end());
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
  StepPlan p;
  p.kind = next();
  p.exit_code = next();
  for (int64_t n = count(); n > 0; --n) {
    int64_t a = next();
    p.swap_out.push_back({a, next()});
  }
  for (int64_t n = count(); n > 0; --n) {
    int64_t a = next();
    p.swap_in.push_back({a, next()});
  }
  for (int64_t n = count(); n > 0; --n) {
    const int64_t q = count(), ctx = next(), nb = count();
    std::vector<int64_t> table(nb), toks(q);
    for (auto& b : table) b = next();
    for (auto& t : toks) t = next();
    p.batch.add_sequence(toks, ctx, std::move(table));
  }
  for (int64_t n = count(); n > 0; --n) p.batch.sample_rows.push_back(next());
  ANDY_CHECK(i == w.size(), "step plan: ", w.size() - i, " trailing words");
  return p;
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
    // Idle workers wait here between requests: poll with a growing sleep (up to 2 ms), never
    // a timeout.
    MPI_Request req;
    MPI_CHECK(MPI_Ibcast(&n, 1, MPI_INT64_T, 0, comm_.get(), &req));
    int done = 0;
    int64_t sleep_us = 0;
    while (true) {
      MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (done) break;
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
