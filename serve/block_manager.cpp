// KV block pool with reference counts and automatic prefix caching (see block_manager.h).
// Invariant: every device block is in exactly one state: free (in free_, ref_count 0, no hash),
// evictable (in evictable_, ref_count 0, hash registered) or used (ref_count > 0); a block has a
// hash exactly when cached_ maps that hash to it.
#include "serve/block_manager.h"

#include "core/base/error.h"

namespace andy::serve {

namespace {
constexpr uint64_t kFnvOffsetBasis = 14695981039346656037ULL;
constexpr uint64_t kFnvPrime = 1099511628211ULL;

// FNV-1a step over the little-endian bytes of `v` (the same hash on every host).
uint64_t fnv1a_bytes(uint64_t h, uint64_t v, int num_bytes) {
  for (int i = 0; i < num_bytes; ++i) {
    h ^= (v >> (8 * i)) & 0xffU;
    h *= kFnvPrime;
  }
  return h;
}
}  // namespace

BlockManager::BlockManager(const BlockManagerOptions& opts) : opts_(opts) {
  ANDY_CHECK_T(ConfigError, opts.num_blocks >= 0, "num_blocks must be >= 0, got ", opts.num_blocks);
  ANDY_CHECK_T(ConfigError, opts.block_size > 0, "block_size must be > 0, got ", opts.block_size);
  ANDY_CHECK_T(ConfigError, opts.num_host_blocks >= 0, "num_host_blocks must be >= 0, got ",
               opts.num_host_blocks);
  blocks_.resize(static_cast<size_t>(opts.num_blocks));
  for (int64_t b = 0; b < opts.num_blocks; ++b) free_.insert(free_.end(), b);
  host_in_use_.assign(static_cast<size_t>(opts.num_host_blocks), false);
  for (int64_t b = 0; b < opts.num_host_blocks; ++b) host_free_.insert(host_free_.end(), b);
}

int64_t BlockManager::block_size() const { return opts_.block_size; }
int64_t BlockManager::num_blocks() const { return opts_.num_blocks; }

int64_t BlockManager::num_available() const {
  return static_cast<int64_t>(free_.size() + evictable_.size());
}

int64_t BlockManager::num_used() const { return num_used_; }

void BlockManager::check_block(int64_t block) const {
  ANDY_CHECK(block >= 0 && block < opts_.num_blocks, "block id ", block, " out of range [0, ",
             opts_.num_blocks, ")");
}

void BlockManager::unlink_evictable(BlockState& s) {
  evictable_.erase(s.lru_pos);
  s.lru_pos = evictable_.end();
  s.evictable = false;
}

int64_t BlockManager::allocate() {
  int64_t block = -1;
  if (!free_.empty()) {
    block = *free_.begin();
    free_.erase(free_.begin());
  } else if (!evictable_.empty()) {
    block = evictable_.front();
    BlockState& s = blocks_[static_cast<size_t>(block)];
    unlink_evictable(s);
    cached_.erase(s.hash);
    s.has_hash = false;
    s.hash = 0;
  } else {
    return -1;
  }
  blocks_[static_cast<size_t>(block)].ref_count = 1;
  ++num_used_;
  return block;
}

void BlockManager::retain(int64_t block) {
  check_block(block);
  BlockState& s = blocks_[static_cast<size_t>(block)];
  if (s.ref_count == 0) {
    ANDY_CHECK(s.evictable, "retain of free block ", block);
    unlink_evictable(s);
    ++num_used_;
  }
  ++s.ref_count;
}

void BlockManager::release(int64_t block) {
  check_block(block);
  BlockState& s = blocks_[static_cast<size_t>(block)];
  ANDY_CHECK(s.ref_count > 0, "release of block ", block, " with reference count 0");
  if (--s.ref_count > 0) return;
  --num_used_;
  if (s.has_hash) {
    s.lru_pos = evictable_.insert(evictable_.end(), block);
    s.evictable = true;
  } else {
    free_.insert(block);
  }
}

int64_t BlockManager::ref_count(int64_t block) const {
  check_block(block);
  return blocks_[static_cast<size_t>(block)].ref_count;
}

uint64_t BlockManager::hash_block(uint64_t prev_hash, const int32_t* tokens, int64_t n) {
  ANDY_CHECK(n >= 0 && (n == 0 || tokens != nullptr), "hash_block: bad token span (n = ", n, ")");
  uint64_t h = fnv1a_bytes(kFnvOffsetBasis, prev_hash, 8);
  for (int64_t i = 0; i < n; ++i) {
    h = fnv1a_bytes(h, static_cast<uint32_t>(tokens[i]), 4);
  }
  return h;
}

int64_t BlockManager::lookup(uint64_t hash) {
  if (!opts_.prefix_caching) return -1;
  ++prefix_queries_;
  auto it = cached_.find(hash);
  if (it == cached_.end()) return -1;
  ++prefix_hits_;
  retain(it->second);
  return it->second;
}

void BlockManager::register_full(int64_t block, uint64_t hash) {
  if (!opts_.prefix_caching) return;
  check_block(block);
  BlockState& s = blocks_[static_cast<size_t>(block)];
  ANDY_CHECK(s.ref_count > 0, "register_full of unreferenced block ", block);
  if (s.has_hash || cached_.count(hash) != 0) return;
  cached_.emplace(hash, block);
  s.has_hash = true;
  s.hash = hash;
}

int64_t BlockManager::prefix_queries() const { return prefix_queries_; }
int64_t BlockManager::prefix_hits() const { return prefix_hits_; }

int64_t BlockManager::allocate_host() {
  if (host_free_.empty()) return -1;
  int64_t b = *host_free_.begin();
  host_free_.erase(host_free_.begin());
  host_in_use_[static_cast<size_t>(b)] = true;
  return b;
}

void BlockManager::release_host(int64_t host_block) {
  ANDY_CHECK(host_block >= 0 && host_block < opts_.num_host_blocks, "host block id ", host_block,
             " out of range [0, ", opts_.num_host_blocks, ")");
  ANDY_CHECK(host_in_use_[static_cast<size_t>(host_block)], "release of free host block ",
             host_block);
  host_in_use_[static_cast<size_t>(host_block)] = false;
  host_free_.insert(host_block);
}

int64_t BlockManager::num_host_free() const { return static_cast<int64_t>(host_free_.size()); }

}  // namespace andy::serve
