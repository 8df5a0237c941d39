// DataLoader: serves fixed windows of seq_len + 1 tokens from the HDF5 shards of one split as
// (input, target) pairs, shuffled globally, split disjointly over data-parallel ranks, resumable
// from a cursor, read ahead on a background thread.
//
// Windows. The shards of a split, in path order, form one token stream of T tokens (documents
// end with eos; a window may span documents and shards). Window w is tokens
// [w * seq_len, w * seq_len + seq_len + 1): input = its first seq_len tokens, target = its last
// seq_len. There are W = (T - 1) / seq_len windows; the < seq_len trailing tokens are unused.
//
// Order. Epoch e serves the windows in the order of IndexPermutation(W, key(seed, e)) (or in
// index order with shuffle = false). A global batch is G = batch_size * dp_size consecutive
// positions of that order; step s gives DP rank d the positions
// [s*G + d*batch_size, s*G + (d+1)*batch_size). TP peers pass the same dp_rank and so get
// identical batches. The order depends only on (seed, epoch, W, batch_size, dp_size).
//
// Remainder. steps_per_epoch = W / G (floor). The last W - steps_per_epoch * G positions of an
// epoch's order are not served in that epoch: within an epoch no window is served twice and
// the DP ranks together serve every window but those (fewer than G, a different random set
// each epoch since the order is reshuffled). When G divides W every window is served.
// A split with W < G is refused.
//
// Cursor. {epoch, position}: the epoch and micro-batch index within it of the batch the next
// next_batch() returns. Save cursor() in a checkpoint; a loader built with that cursor (or
// seek()) returns exactly the batches the uninterrupted run would have. next_batch() runs on
// from the last step of an epoch into step 0 of the next.
//
// Thread-safety: one consumer thread calls next_batch()/cursor()/seek(); the read-ahead thread
// is internal. Must not outlive nothing: it owns its files.
//
//   DataLoader train(LoaderOptions{...});        // see LoaderOptions
//   Batch b = train.next_batch();                 // b.input, b.target: int64 [B, seq_len]
//   ckpt.data_cursor = train.cursor();
#pragma once

#include <torch/torch.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/shard.h"

namespace andy::data {

struct LoaderOptions {
  // A split: a directory of shards written by `andyllm preprocess` (its parent must hold the
  // run's manifest.json), a glob ("data/x/train/*.h5", no manifest needed), one .h5 file, or
  // "DIR.h5" / "DIR.bin" meaning directory DIR (the Python workflow's --train_file names).
  std::string split;
  int64_t seq_len = 128;
  int64_t batch_size = 8;  // micro-batch per DP rank
  int dp_rank = 0;
  int dp_size = 1;
  uint64_t seed = 1234;
  bool shuffle = true;  // false: index order every epoch (evaluation)
  // The run's tokenizer: shards with another vocab size or tokenizer checksum are refused.
  // 0 / "" skip the check (inspection tools only).
  int64_t expected_vocab_size = 0;
  std::string tokenizer_checksum;
  std::string tokenizer_checksum_legacy;  // the same file's checksum as version-1 shards wrote it
  int64_t prefetch_batches = 4;   // batches read ahead; 0 reads in next_batch(). Default: 4
  bool verify_checksums = false;  // compare each shard's file checksum with manifest.json first
  bool check_token_ids = true;    // every token read must be < the shard's vocab_size
};

struct LoaderCursor {
  int64_t epoch = 0;
  int64_t position = 0;  // micro-batches of `epoch` already served
  bool operator==(const LoaderCursor& o) const {
    return epoch == o.epoch && position == o.position;
  }
};

struct Batch {
  torch::Tensor input;           // int64 [batch_size, seq_len]
  torch::Tensor target;          // int64 [batch_size, seq_len], input shifted by one
  LoaderCursor cursor;           // where this batch sits (epoch, position)
  std::vector<int64_t> windows;  // the global window index of each row
};

struct LoaderStats {
  int64_t batches_read = 0;
  double read_seconds = 0;  // time spent reading + assembling batches (read-ahead thread)
  int64_t batches_served = 0;
  double wait_seconds = 0;        // time next_batch() waited for the read-ahead thread
  double first_wait_seconds = 0;  // of which the first batch (nothing read ahead yet)
  double max_wait_seconds = 0;    // longest wait after the first batch
};

// The shard files a split names, sorted; checks listed in LoaderOptions::split.
// Throws ConfigError (nothing there, no manifest) or IoError (manifest disagrees).
std::vector<std::string> resolve_split(const std::string& split, bool verify_checksums = false);

class DataLoader {
 public:
  // Opens and validates every shard. Throws ConfigError for a vocab/tokenizer mismatch or a
  // split smaller than one global batch; IoError (naming the file) for a bad shard.
  explicit DataLoader(const LoaderOptions& opts, LoaderCursor start = {});
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  Batch next_batch();
  LoaderCursor cursor() const { return cursor_; }
  void seek(LoaderCursor c);

  int64_t total_tokens() const { return total_tokens_; }
  int64_t windows_per_epoch() const { return windows_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  int64_t global_batch() const { return opts_.batch_size * opts_.dp_size; }
  const std::vector<ShardInfo>& shards() const { return infos_; }
  const LoaderOptions& options() const { return opts_; }
  LoaderStats stats() const;

  // Global window served at (epoch, step) in row `row` of DP rank `dp_rank`.
  int64_t window_at(int64_t epoch, int64_t step, int dp_rank, int64_t row) const;
  // Reads tokens [offset, offset + count) of the split's token stream.
  // Throws IoError naming the shard and the token offset of an id outside its vocabulary.
  void check_ids(size_t shard, int64_t offset, int64_t n, const int64_t* ids) const;
  void read_tokens(int64_t offset, int64_t count, int64_t* out) const;

 private:
  Batch make_batch(LoaderCursor c) const;
  LoaderCursor advance(LoaderCursor c) const;
  void start_thread();
  void stop_thread();
  void producer_loop(LoaderCursor from);

  LoaderOptions opts_;
  std::vector<std::unique_ptr<ShardReader>> readers_;
  std::vector<ShardInfo> infos_;
  std::vector<int64_t> starts_;  // token offset of each shard in the stream, plus the total
  int64_t total_tokens_ = 0, windows_ = 0, steps_per_epoch_ = 0;
  LoaderCursor cursor_;

  struct Item {
    Batch batch;
    std::exception_ptr error;
  };
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool stop_ = false;
  std::thread thread_;
  LoaderStats stats_;
};

}  // namespace andy::data
