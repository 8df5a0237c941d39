// Rank-grid mapping as a table: for every (world, tp), the (tp_rank, dp_rank) of every rank.
#include <gtest/gtest.h>

#include "core/base/error.h"
#include "parallel/process_grid.h"

using namespace andy;

struct GridCase {
  int world, tp;
  std::vector<GridCoords> expected;  // indexed by rank
};

TEST(ProcessGrid, MappingTable) {
  const std::vector<GridCase> table = {
      {1, 1, {{0, 0}}},
      {2, 1, {{0, 0}, {0, 1}}},
      {2, 2, {{0, 0}, {1, 0}}},
      {4, 1, {{0, 0}, {0, 1}, {0, 2}, {0, 3}}},
      {4, 2, {{0, 0}, {1, 0}, {0, 1}, {1, 1}}},
      {4, 4, {{0, 0}, {1, 0}, {2, 0}, {3, 0}}},
      {6, 3, {{0, 0}, {1, 0}, {2, 0}, {0, 1}, {1, 1}, {2, 1}}},
      {8, 2, {{0, 0}, {1, 0}, {0, 1}, {1, 1}, {0, 2}, {1, 2}, {0, 3}, {1, 3}}},
      {8, 4, {{0, 0}, {1, 0}, {2, 0}, {3, 0}, {0, 1}, {1, 1}, {2, 1}, {3, 1}}},
  };
  for (const auto& c : table) {
    for (int r = 0; r < c.world; ++r) {
      GridCoords got = grid_coords(r, c.world, c.tp);
      EXPECT_EQ(got.tp_rank, c.expected[r].tp_rank) << "world " << c.world << " tp " << c.tp << " rank " << r;
      EXPECT_EQ(got.dp_rank, c.expected[r].dp_rank) << "world " << c.world << " tp " << c.tp << " rank " << r;
      EXPECT_EQ(r, got.tp_rank + c.tp * got.dp_rank);
    }
  }
}

TEST(ProcessGrid, GroupsAreAdjacentForTpAndStridedForDp) {
  EXPECT_EQ(tp_group_ranks(1, 8, 4), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(dp_group_ranks(1, 8, 4), (std::vector<int>{1, 5}));
  EXPECT_EQ(dp_group_ranks(0, 6, 3), (std::vector<int>{0, 3}));
  EXPECT_EQ(tp_group_ranks(0, 4, 1), (std::vector<int>{0}));
}

TEST(ProcessGrid, RejectsIndivisibleWorld) {
  try {
    grid_coords(0, 3, 2);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("world size 3 is not divisible by tensor_parallel_size 2"),
              std::string::npos) << e.what();
  }
}
