// KV-cache block accounting for the serving engine (rank 0 only; workers receive block ids in
// the step plan). Blocks carry reference counts so n > 1 completions and prefix-cache hits share
// a prompt's blocks. Prefix caching (vLLM's automatic prefix caching): a *full* block is keyed
// by a hash of its tokens chained with the previous block's hash; a freed block whose hash is
// registered stays cached (evictable, least recently freed first) until the memory is needed.
// Host (swap) blocks are a separate pool of plain ids.
// Not thread-safe: the engine thread owns it.
//
//   BlockManager bm({.num_blocks = 64, .block_size = 16});
//   int64_t b = bm.allocate();                       // refcount 1, or -1 when none is free
//   uint64_t h = BlockManager::hash_block(prev_hash, block_tokens.data(), bm.block_size());
//   bm.register_full(b, h);                          // now findable by lookup(h)
//   int64_t hit = bm.lookup(h);                      // the same block, refcount + 1
//   bm.release(b);                                   // refcount - 1; cached or freed at 0
#pragma once

#include <cstdint>
#include <list>
#include <set>
#include <unordered_map>
#include <vector>

namespace andy::serve {

struct BlockManagerOptions {
  int64_t num_blocks = 0;       // device (KV pool) blocks
  int64_t block_size = 16;      // tokens per block. Default: 16
  int64_t num_host_blocks = 0;  // swap space in blocks (0: no swapping). Default: 0
  bool prefix_caching = true;   // Default: on
};

class BlockManager {
 public:
  explicit BlockManager(const BlockManagerOptions& opts);

  int64_t block_size() const;
  int64_t num_blocks() const;
  // Blocks that allocate() can hand out now: free plus cached-but-unreferenced (evictable).
  int64_t num_available() const;
  // Blocks with a reference count > 0.
  int64_t num_used() const;

  // A block with refcount 1, evicting the least recently freed cached block when no plain free
  // block is left (its hash is forgotten). -1 when every block is referenced.
  int64_t allocate();
  // One more reference (a forked sequence sharing the block). `block` must be referenced or
  // cached; misuse (a free block, an id out of range, a release at refcount 0) throws andy::Error.
  void retain(int64_t block);
  // One reference less; at zero the block becomes evictable if it has a registered hash, else
  // free.
  void release(int64_t block);
  int64_t ref_count(int64_t block) const;

  // Prefix cache. hash_block chains `prev_hash` (0 for the first block) with the block's tokens.
  static uint64_t hash_block(uint64_t prev_hash, const int32_t* tokens, int64_t n);
  // The cached block with this hash, retained (refcount + 1, no longer evictable); -1 if none.
  // Counts a query, and a hit when found.
  int64_t lookup(uint64_t hash);
  // Records that full block `block` holds the tokens hashed by `hash` (first writer wins: if
  // another block has the hash already, or this block has one, nothing changes). `block` must
  // be referenced. With prefix_caching off, lookup returns -1 and counts nothing, and
  // register_full does nothing.
  void register_full(int64_t block, uint64_t hash);
  int64_t prefix_queries() const;  // lookups
  int64_t prefix_hits() const;     // lookups that found a block

  // Host pool for swapping: -1 when full.
  int64_t allocate_host();
  void release_host(int64_t host_block);
  int64_t num_host_free() const;

 private:
  struct BlockState {
    int64_t ref_count = 0;
    bool has_hash = false;  // registered: cached_[hash] == this block
    uint64_t hash = 0;
    bool evictable = false;  // ref_count 0 with a hash: in evictable_ at lru_pos
    std::list<int64_t>::iterator lru_pos;
  };

  void check_block(int64_t block) const;
  // Removes a cached unreferenced block from the LRU list (it stays cached).
  void unlink_evictable(BlockState& s);

  BlockManagerOptions opts_;
  std::vector<BlockState> blocks_;
  std::set<int64_t> free_;                        // ref_count 0, no hash; lowest id first
  std::list<int64_t> evictable_;                  // ref_count 0 with a hash; front: least recent
  std::unordered_map<uint64_t, int64_t> cached_;  // hash -> block
  int64_t num_used_ = 0;
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
  std::set<int64_t> host_free_;
  std::vector<bool> host_in_use_;
};

}  // namespace andy::serve
