// The packed batch of one inference step (vLLM's "flattened" input): the new tokens of many
// sequences side by side, prefills (whole or a chunk) and decodes (one token) mixed, each
// sequence attending to its tokens already in the paged KV cache plus its new ones.
//
// Sequence s owns rows query_start[s] .. query_start[s+1]-1 of the packed tokens; its new
// tokens sit at positions context_len[s] - query_len(s) .. context_len[s] - 1, and its KV lives
// in the blocks of block_tables[s] (token p in block block_tables[s][p / block_size], offset
// p % block_size). slot_mapping is derived from the tables. Only the rows listed in
// sample_rows get logits (usually each sequence's last row, when its prompt is complete).
// The batch is plain host data: building it and running the forward change no scheduling
// state.
//
//   ForwardBatch b;
//   b.add_sequence({5, 9, 11}, /*context_len=*/3, {0});   // a 3-token prompt in block 0
//   b.add_sequence({42}, /*context_len=*/18, {1, 2});     // a decode at position 17
//   b.sample_last_rows();
//   at::Tensor logits = model->forward_batch(b, cache);   // [2, V_local]
#pragma once

#include <cstdint>
#include <vector>

namespace andy {

struct ForwardBatch {
  std::vector<int64_t> tokens;               // [N] packed new tokens
  std::vector<int64_t> query_start{0};       // [S + 1] row offsets of each sequence
  std::vector<int64_t> context_len;          // [S] cached + new tokens after this step
  std::vector<std::vector<int64_t>> block_tables;  // [S] block ids in token order
  std::vector<int64_t> sample_rows;          // rows of `tokens` whose logits are returned

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_sequences() const { return static_cast<int64_t>(context_len.size()); }
  int64_t query_len(int64_t s) const { return query_start[s + 1] - query_start[s]; }
  // Appends a sequence's new tokens; context_len counts them too.
  void add_sequence(const std::vector<int64_t>& new_tokens, int64_t context_len,
                    std::vector<int64_t> block_table);
  // sample_rows = the last row of every sequence.
  void sample_last_rows();
  // Checks the batch against the cache geometry and the model's context; throws Error naming
  // the sequence and the numbers.
  void validate(int64_t block_size, int64_t num_blocks, int64_t max_seq_len) const;
  // Per packed row: its position, and its flat cache slot (block * block_size + offset).
  std::vector<int64_t> positions() const;
  std::vector<int64_t> slot_mapping(int64_t block_size) const;
};

}  // namespace andy
