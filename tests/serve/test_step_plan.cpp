// Step plans: encode/decode round trip, malformed input refused, and the BlockTables mirror
// applying deltas (kept blocks, new blocks, resets after preemption, released sequences).
#include <gtest/gtest.h>

#include "core/base/error.h"
#include "serve/step_plan.h"

using namespace andy;
using namespace andy::serve;

TEST(StepPlan, RoundTripsEveryField) {
  StepPlan p;
  p.kind = StepPlan::kForward;
  p.swap_out = {{3, 0}, {4, 1}};
  p.swap_in = {{2, 9}};
  p.seqs.push_back({7, 0, 5, {1, 2}, {10, 11, 12, 13, 14}});
  p.seqs.push_back({8, 2, 33, {6}, {42}});
  p.sample_rows = {4, 5};
  p.released = {1, 5};
  p.greedy = true;
  StepPlan q = StepPlan::decode(p.encode());
  EXPECT_EQ(q.encode(), p.encode());
  EXPECT_TRUE(q.greedy);
  EXPECT_EQ(q.seqs[1].tokens, std::vector<int64_t>{42});
  EXPECT_EQ(q.swap_in[0].second, 9);
  std::vector<int64_t> words = p.encode();
  words.pop_back();
  EXPECT_THROW(StepPlan::decode(words), Error);
  words = p.encode();
  words.push_back(0);
  EXPECT_THROW(StepPlan::decode(words), Error);
}

TEST(BlockTables, AppliesDeltasAndResets) {
  BlockTables t;
  StepPlan a;
  a.seqs.push_back({1, 0, 6, {4, 5}, {1, 2, 3, 4, 5, 6}});  // block size 4: 2 blocks
  ForwardBatch b = t.apply(a);
  EXPECT_EQ(b.block_tables[0], (std::vector<int64_t>{4, 5}));
  StepPlan d;  // a decode that needs a third block
  d.seqs.push_back({1, 2, 9, {7}, {9}});
  d.sample_rows = {0};
  b = t.apply(d);
  EXPECT_EQ(b.block_tables[0], (std::vector<int64_t>{4, 5, 7}));
  EXPECT_EQ(b.context_len[0], 9);
  EXPECT_EQ(b.sample_rows, std::vector<int64_t>{0});
  StepPlan r;  // preempted and recomputed in fresh blocks: n_keep 0 resets the table
  r.seqs.push_back({1, 0, 4, {0}, {1, 2, 3, 4}});
  EXPECT_EQ(t.apply(r).block_tables[0], std::vector<int64_t>{0});
  StepPlan bad;
  bad.seqs.push_back({1, 3, 4, {}, {1}});  // keeps more blocks than it has
  EXPECT_THROW(t.apply(bad), Error);
  StepPlan rel;
  rel.released = {1};
  t.apply(rel);
  EXPECT_EQ(t.size(), 0u);
}
