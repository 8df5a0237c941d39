// ForwardBatch helpers (see forward_batch.h).
#include "core/model/forward_batch.h"

#include "core/base/error.h"

namespace andy {

void ForwardBatch::add_sequence(const std::vector<int64_t>& new_tokens, int64_t ctx,
                                std::vector<int64_t> block_table) {
  tokens.insert(tokens.end(), new_tokens.begin(), new_tokens.end());
  query_start.push_back(static_cast<int64_t>(tokens.size()));
  context_len.push_back(ctx);
  block_tables.push_back(std::move(block_table));
}

void ForwardBatch::sample_last_rows() {
  sample_rows.clear();
  for (int64_t s = 0; s < num_sequences(); ++s) sample_rows.push_back(query_start[s + 1] - 1);
}

void ForwardBatch::validate(int64_t block_size, int64_t num_blocks, int64_t max_seq_len) const {
  ANDY_CHECK(static_cast<int64_t>(query_start.size()) == num_sequences() + 1 &&
                 static_cast<int64_t>(block_tables.size()) == num_sequences() &&
                 query_start.back() == num_tokens(),
             "ForwardBatch: inconsistent sizes (", num_sequences(), " sequences, ",
             query_start.size(), " offsets, ", num_tokens(), " tokens)");
  for (int64_t s = 0; s < num_sequences(); ++s) {
    const int64_t q = query_len(s), ctx = context_len[s];
    ANDY_CHECK(q >= 1 && ctx >= q, "ForwardBatch: sequence ", s, " has ", q,
               " new tokens and a context of ", ctx);
    ANDY_CHECK(ctx <= max_seq_len, "ForwardBatch: sequence ", s, " reaches ", ctx,
               " tokens, beyond model.max_seq_len = ", max_seq_len);
    ANDY_CHECK(static_cast<int64_t>(block_tables[s].size()) * block_size >= ctx,
               "ForwardBatch: sequence ", s, " needs ", ctx, " cache slots but its block table has ",
               block_tables[s].size(), " blocks of ", block_size);
    for (int64_t b : block_tables[s])
      ANDY_CHECK(b >= 0 && b < num_blocks, "ForwardBatch: sequence ", s, " names block ", b,
                 " of a cache with ", num_blocks, " blocks");
  }
  for (int64_t r : sample_rows)
    ANDY_CHECK(r >= 0 && r < num_tokens(), "ForwardBatch: sample row ", r, " outside 0..",
               num_tokens() - 1);
}

std::vector<int64_t> ForwardBatch::positions() const {
  std::vector<int64_t> out(tokens.size());
  for (int64_t s = 0; s < num_sequences(); ++s) {
    const int64_t first = context_len[s] - query_len(s);
    for (int64_t i = 0; i < query_len(s); ++i) out[query_start[s] + i] = first + i;
  }
  return out;
}

std::vector<int64_t> ForwardBatch::slot_mapping(int64_t block_size) const {
  std::vector<int64_t> out(tokens.size());
  for (int64_t s = 0; s < num_sequences(); ++s) {
    const int64_t first = context_len[s] - query_len(s);
    for (int64_t i = 0; i < query_len(s); ++i) {
      const int64_t p = first + i;
      out[query_start[s] + i] = block_tables[s][p / block_size] * block_size + p % block_size;
    }
  }
  return out;
}

}  // namespace andy
