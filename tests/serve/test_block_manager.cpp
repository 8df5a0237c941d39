// BlockManager units: allocation order, reference counts, prefix cache hits and LRU eviction,
// host pool, misuse, and a randomized run checked step by step against a simple O(n) model.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include "core/base/error.h"
#include "serve/block_manager.h"

using namespace andy;
using namespace andy::serve;

namespace {

BlockManagerOptions make_options(int64_t num_blocks, int64_t num_host_blocks = 0,
                                 bool prefix_caching = true) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = 4;
  o.num_host_blocks = num_host_blocks;
  o.prefix_caching = prefix_caching;
  return o;
}

uint64_t hash_of(uint64_t prev, const std::vector<int32_t>& tokens) {
  return BlockManager::hash_block(prev, tokens.data(), static_cast<int64_t>(tokens.size()));
}

// FNV-1a 64 over a byte string, written out independently of the implementation.
uint64_t reference_fnv1a(const std::vector<unsigned char>& bytes) {
  uint64_t h = 14695981039346656037ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

void append_le(std::vector<unsigned char>& out, uint64_t v, int num_bytes) {
  for (int i = 0; i < num_bytes; ++i) out.push_back(static_cast<unsigned char>(v >> (8 * i)));
}

}  // namespace

TEST(BlockManager, AllocatesLowestIdFirstAndReportsExhaustion) {
  BlockManager bm(make_options(4));
  EXPECT_EQ(bm.num_blocks(), 4);
  EXPECT_EQ(bm.block_size(), 4);
  EXPECT_EQ(bm.num_available(), 4);
  EXPECT_EQ(bm.num_used(), 0);
  for (int64_t want = 0; want < 4; ++want) {
    EXPECT_EQ(bm.allocate(), want);
    EXPECT_EQ(bm.ref_count(want), 1);
  }
  EXPECT_EQ(bm.allocate(), -1);
  EXPECT_EQ(bm.num_available(), 0);
  EXPECT_EQ(bm.num_used(), 4);
}

TEST(BlockManager, ReleaseReturnsCapacityAndLowestIdIsReused) {
  BlockManager bm(make_options(4));
  for (int i = 0; i < 4; ++i) bm.allocate();
  bm.release(2);
  bm.release(1);
  EXPECT_EQ(bm.num_available(), 2);
  EXPECT_EQ(bm.num_used(), 2);
  EXPECT_EQ(bm.ref_count(1), 0);
  EXPECT_EQ(bm.allocate(), 1);
  EXPECT_EQ(bm.allocate(), 2);
  EXPECT_EQ(bm.allocate(), -1);
}

TEST(BlockManager, RetainSharesBlockUntilLastRelease) {
  BlockManager bm(make_options(2));
  int64_t b = bm.allocate();
  bm.retain(b);
  bm.retain(b);
  EXPECT_EQ(bm.ref_count(b), 3);
  EXPECT_EQ(bm.num_used(), 1);
  bm.release(b);
  bm.release(b);
  EXPECT_EQ(bm.ref_count(b), 1);
  EXPECT_EQ(bm.num_available(), 1);
  bm.release(b);
  EXPECT_EQ(bm.ref_count(b), 0);
  EXPECT_EQ(bm.num_available(), 2);
  EXPECT_EQ(bm.num_used(), 0);
}

TEST(BlockManager, HashIsDeterministicAndSensitiveToEveryInput) {
  const std::vector<int32_t> a = {1, 2, 3, 4};
  const uint64_t h = hash_of(0, a);
  EXPECT_EQ(h, hash_of(0, a));
  EXPECT_NE(h, hash_of(1, a));                     // prev differs
  EXPECT_NE(h, hash_of(0, {1, 2, 3, 5}));          // last token differs
  EXPECT_NE(h, hash_of(0, {0, 2, 3, 4}));          // first token differs
  EXPECT_NE(h, hash_of(0, {2, 1, 3, 4}));          // order differs
  EXPECT_NE(h, hash_of(0, {1, 2, 3}));             // length differs
  EXPECT_NE(h, hash_of(0, {1, 2, 3, 4 + 65536}));  // high bytes count
  EXPECT_NE(hash_of(h, a), hash_of(0, a));         // chaining changes the key

  // FNV-1a 64 over the little-endian bytes of prev, then of each token.
  std::vector<unsigned char> bytes;
  append_le(bytes, 0x0123456789abcdefULL, 8);
  for (int32_t t : {7, -1, 32000}) append_le(bytes, static_cast<uint32_t>(t), 4);
  EXPECT_EQ(hash_of(0x0123456789abcdefULL, {7, -1, 32000}), reference_fnv1a(bytes));
  EXPECT_EQ(BlockManager::hash_block(0, nullptr, 0),
            reference_fnv1a(std::vector<unsigned char>(8)));
}

TEST(BlockManager, PrefixCacheHitAfterRelease) {
  BlockManager bm(make_options(4));
  const uint64_t h0 = hash_of(0, {1, 2, 3, 4});
  const uint64_t h1 = hash_of(h0, {5, 6, 7, 8});
  int64_t b0 = bm.allocate();
  int64_t b1 = bm.allocate();
  bm.register_full(b0, h0);
  bm.register_full(b1, h1);

  // While referenced: a hit shares the block.
  EXPECT_EQ(bm.lookup(h0), b0);
  EXPECT_EQ(bm.ref_count(b0), 2);
  bm.release(b0);

  // Released: cached, evictable, counted as available, not used.
  bm.release(b0);
  bm.release(b1);
  EXPECT_EQ(bm.ref_count(b0), 0);
  EXPECT_EQ(bm.num_available(), 4);
  EXPECT_EQ(bm.num_used(), 0);

  EXPECT_EQ(bm.lookup(h0), b0);
  EXPECT_EQ(bm.lookup(h1), b1);
  EXPECT_EQ(bm.ref_count(b0), 1);
  EXPECT_EQ(bm.num_available(), 2);
  EXPECT_EQ(bm.num_used(), 2);
  EXPECT_EQ(bm.lookup(hash_of(h1, {9, 9, 9, 9})), -1);
  EXPECT_EQ(bm.prefix_queries(), 4);
  EXPECT_EQ(bm.prefix_hits(), 3);

  // Retaining a cached unreferenced block also takes it off the evictable list.
  bm.release(b0);
  bm.retain(b0);
  EXPECT_EQ(bm.ref_count(b0), 1);
  EXPECT_EQ(bm.num_available(), 2);
  EXPECT_EQ(bm.allocate(), 2);
  EXPECT_EQ(bm.allocate(), 3);
  EXPECT_EQ(bm.allocate(), -1);  // b0 and b1 are referenced: nothing to evict
}

TEST(BlockManager, EvictsLeastRecentlyReleasedCachedBlock) {
  BlockManager bm(make_options(3));
  std::vector<uint64_t> h;
  for (int64_t b = 0; b < 3; ++b) {
    EXPECT_EQ(bm.allocate(), b);
    h.push_back(hash_of(0, {static_cast<int32_t>(b)}));
    bm.register_full(b, h.back());
  }
  bm.release(1);
  bm.release(0);
  bm.release(2);  // LRU order: 1, 0, 2
  EXPECT_EQ(bm.num_available(), 3);

  EXPECT_EQ(bm.allocate(), 1);
  EXPECT_EQ(bm.ref_count(1), 1);
  EXPECT_EQ(bm.lookup(h[1]), -1);  // evicted: its hash is forgotten
  EXPECT_EQ(bm.lookup(h[0]), 0);   // still cached; now referenced, so not evictable
  EXPECT_EQ(bm.allocate(), 2);
  EXPECT_EQ(bm.allocate(), -1);
  EXPECT_EQ(bm.lookup(h[2]), -1);

  // The evicted block can carry a new hash, and a freed unhashed block goes back to the free
  // set rather than the evictable list.
  bm.register_full(1, h[1]);
  bm.release(2);
  bm.release(1);
  EXPECT_EQ(bm.allocate(), 2);    // plain free blocks come before evictable ones
  EXPECT_EQ(bm.lookup(h[1]), 1);  // still cached
}

TEST(BlockManager, RegisterIsFirstWriterWins) {
  BlockManager bm(make_options(4));
  const uint64_t h = hash_of(0, {1, 2, 3, 4});
  const uint64_t g = hash_of(0, {5, 6, 7, 8});
  int64_t a = bm.allocate();
  int64_t b = bm.allocate();
  bm.register_full(a, h);
  bm.register_full(b, h);  // hash taken: ignored
  bm.register_full(a, g);  // block already hashed: ignored
  EXPECT_EQ(bm.lookup(h), a);
  EXPECT_EQ(bm.lookup(g), -1);
  bm.release(a);
  bm.release(a);
  bm.release(b);
  // a is cached, b was not registered so it is plain free again.
  EXPECT_EQ(bm.allocate(), b);
  EXPECT_EQ(bm.allocate(), 2);
  EXPECT_EQ(bm.allocate(), 3);
  EXPECT_EQ(bm.allocate(), a);  // evicted last
  EXPECT_EQ(bm.lookup(h), -1);
  bm.register_full(b, g);  // g was never registered, so b can take it
  EXPECT_EQ(bm.lookup(g), b);
}

TEST(BlockManager, DisabledPrefixCachingNeverCachesOrCounts) {
  BlockManager bm(make_options(2, 0, /*prefix_caching=*/false));
  const uint64_t h = hash_of(0, {1, 2, 3, 4});
  int64_t b = bm.allocate();
  bm.register_full(b, h);
  EXPECT_EQ(bm.lookup(h), -1);
  EXPECT_EQ(bm.ref_count(b), 1);
  bm.release(b);
  EXPECT_EQ(bm.lookup(h), -1);
  EXPECT_EQ(bm.prefix_queries(), 0);
  EXPECT_EQ(bm.prefix_hits(), 0);
  EXPECT_EQ(bm.num_available(), 2);
  EXPECT_EQ(bm.allocate(), 0);  // back in the free set, lowest id first
  EXPECT_THROW(bm.retain(1), Error);
}

TEST(BlockManager, HostPool) {
  BlockManager bm(make_options(1, 3));
  EXPECT_EQ(bm.num_host_free(), 3);
  EXPECT_EQ(bm.allocate_host(), 0);
  EXPECT_EQ(bm.allocate_host(), 1);
  EXPECT_EQ(bm.allocate_host(), 2);
  EXPECT_EQ(bm.allocate_host(), -1);
  EXPECT_EQ(bm.num_host_free(), 0);
  bm.release_host(1);
  EXPECT_EQ(bm.num_host_free(), 1);
  EXPECT_EQ(bm.allocate_host(), 1);
  EXPECT_EQ(bm.num_available(), 1);  // the device pool is separate

  BlockManager none(make_options(1));
  EXPECT_EQ(none.num_host_free(), 0);
  EXPECT_EQ(none.allocate_host(), -1);
}

TEST(BlockManager, MisuseThrows) {
  BlockManager bm(make_options(2, 1));
  EXPECT_THROW(bm.release(0), Error);  // refcount 0
  EXPECT_THROW(bm.retain(0), Error);   // free, not cached
  EXPECT_THROW(bm.release(-1), Error);
  EXPECT_THROW(bm.release(2), Error);
  EXPECT_THROW(bm.retain(2), Error);
  EXPECT_THROW(bm.ref_count(-1), Error);
  EXPECT_THROW(bm.register_full(5, 1), Error);
  EXPECT_THROW(bm.register_full(0, 1), Error);  // unreferenced
  EXPECT_THROW(bm.release_host(0), Error);      // not allocated
  EXPECT_THROW(bm.release_host(1), Error);
  EXPECT_THROW(BlockManager::hash_block(0, nullptr, 2), Error);
  EXPECT_THROW(BlockManager{make_options(-1)}, ConfigError);
  BlockManagerOptions zero_size = make_options(2);
  zero_size.block_size = 0;
  EXPECT_THROW(BlockManager{zero_size}, ConfigError);

  // A double release is caught after the block went back to the free set.
  int64_t b = bm.allocate();
  bm.release(b);
  try {
    bm.release(b);
    FAIL() << "expected andy::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("reference count 0"), std::string::npos) << e.what();
  }
  EXPECT_EQ(bm.num_available(), 2);  // the failed call changed nothing
  EXPECT_EQ(bm.num_used(), 0);
}

// The reference model: per-block refcount, hash and release time; allocate scans all blocks.
struct ModelPool {
  std::vector<int64_t> ref;
  std::vector<std::optional<uint64_t>> hash;
  std::vector<int64_t> released_at;
  std::map<uint64_t, int64_t> cached;
  int64_t clock = 0, queries = 0, hits = 0;

  explicit ModelPool(int64_t n) : ref(n, 0), hash(n), released_at(n, 0) {}

  int64_t allocate() {
    const int64_t n = static_cast<int64_t>(ref.size());
    for (int64_t b = 0; b < n; ++b) {
      if (ref[b] == 0 && !hash[b]) {
        ref[b] = 1;
        return b;
      }
    }
    int64_t victim = -1;
    for (int64_t b = 0; b < n; ++b) {
      if (ref[b] == 0 && (victim < 0 || released_at[b] < released_at[victim])) victim = b;
    }
    if (victim < 0) return -1;
    cached.erase(*hash[victim]);
    hash[victim].reset();
    ref[victim] = 1;
    return victim;
  }
  void release(int64_t b) {
    if (--ref[b] == 0) released_at[b] = clock++;
  }
  int64_t lookup(uint64_t h) {
    ++queries;
    auto it = cached.find(h);
    if (it == cached.end()) return -1;
    ++hits;
    ++ref[it->second];
    return it->second;
  }
  void register_full(int64_t b, uint64_t h) {
    if (hash[b] || cached.count(h)) return;
    hash[b] = h;
    cached[h] = b;
  }
  int64_t used() const {
    int64_t u = 0;
    for (int64_t r : ref) u += r > 0;
    return u;
  }
};

TEST(BlockManager, RandomizedAgainstReferenceModel) {
  constexpr int64_t kBlocks = 16;
  constexpr int kSteps = 20000;
  BlockManager bm(make_options(kBlocks));
  ModelPool model(kBlocks);
  std::mt19937_64 rng(12345);
  auto pick = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  // A small pool of hashes so registrations collide and lookups both hit and miss.
  std::vector<uint64_t> hashes;
  for (int32_t i = 0; i < 24; ++i) hashes.push_back(hash_of(0, {i, i + 1, i + 2, i + 3}));

  int64_t evictions_seen = 0;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<int64_t> referenced;
    int64_t num_plain_free = 0;
    for (int64_t b = 0; b < kBlocks; ++b) {
      if (model.ref[b] > 0) referenced.push_back(b);
      if (model.ref[b] == 0 && !model.hash[b]) ++num_plain_free;
    }
    const int op = static_cast<int>(pick(6));
    if (op == 0 || referenced.empty()) {
      const int64_t want = model.allocate();
      if (want >= 0 && num_plain_free == 0) ++evictions_seen;
      ASSERT_EQ(bm.allocate(), want) << "step " << step;
    } else if (op == 1) {
      const int64_t b = referenced[pick(static_cast<int64_t>(referenced.size()))];
      ++model.ref[b];
      bm.retain(b);
    } else if (op == 2 || op == 3) {
      const int64_t b = referenced[pick(static_cast<int64_t>(referenced.size()))];
      model.release(b);
      bm.release(b);
    } else if (op == 4) {
      const int64_t b = referenced[pick(static_cast<int64_t>(referenced.size()))];
      const uint64_t h = hashes[pick(static_cast<int64_t>(hashes.size()))];
      model.register_full(b, h);
      bm.register_full(b, h);
    } else {
      const uint64_t h = hashes[pick(static_cast<int64_t>(hashes.size()))];
      ASSERT_EQ(bm.lookup(h), model.lookup(h)) << "step " << step;
    }

    ASSERT_EQ(bm.num_available() + bm.num_used(), kBlocks) << "step " << step;
    ASSERT_EQ(bm.num_used(), model.used()) << "step " << step;
    for (int64_t b = 0; b < kBlocks; ++b) {
      ASSERT_EQ(bm.ref_count(b), model.ref[b]) << "step " << step << " block " << b;
    }
    ASSERT_EQ(bm.prefix_queries(), model.queries);
    ASSERT_EQ(bm.prefix_hits(), model.hits);
  }
  // The run must have exercised the interesting paths.
  EXPECT_GT(evictions_seen, 0);
  EXPECT_GT(model.hits, 0);
  EXPECT_LT(model.hits, model.queries);
}
