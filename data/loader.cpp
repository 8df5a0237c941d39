// DataLoader: split resolution, window order, batch assembly and the read-ahead thread.
#include "data/loader.h"

#include <glob.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/base/logging.h"
#include "core/base/strings.h"
#include "data/checksum.h"
#include "data/permutation.h"

namespace fs = std::filesystem;

namespace andy::data {

namespace {

std::vector<std::string> shards_in_dir(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_regular_file() && e.path().extension() == ".h5") out.push_back(e.path().string());
  }
  ANDY_CHECK_T(IoError, !ec, dir.string(), ": cannot list: ", ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

// Cross-checks a split directory against the manifest.json beside it.
void check_manifest(const fs::path& dir, const std::vector<std::string>& files,
                    bool verify_checksums) {
  fs::path manifest = dir.parent_path() / "manifest.json";
  std::string split = dir.filename().string();
  ANDY_CHECK_T(
      ConfigError, fs::is_regular_file(manifest), dir.string(), ": no manifest.json in ",
      dir.parent_path().string(),
      ": the preprocess run that wrote these shards did not finish (rerun andyllm preprocess), "
      "or name the shards with a glob such as '",
      (dir / "*.h5").string(), "' to read them without a manifest");
  nlohmann::json j;
  try {
    std::ifstream in(manifest);
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    ANDY_THROW(IoError, manifest.string(), ": not valid JSON: ", e.what());
  }
  const bool legacy = j.value("format_version", int64_t{1}) < 2;  // the old FNV offset basis
  ANDY_CHECK_T(IoError, j.contains("splits") && j["splits"].contains(split), manifest.string(),
               ": lists no split '", split, "'");
  std::map<std::string, nlohmann::json> listed;
  for (const auto& s : j["splits"][split]["shards"])
    listed[fs::path(s["file"].get<std::string>()).filename().string()] = s;
  std::set<std::string> present;
  for (const auto& f : files) present.insert(fs::path(f).filename().string());
  for (const auto& [name, s] : listed) {
    ANDY_CHECK_T(IoError, present.count(name), (dir / name).string(), ": listed in ",
                 manifest.string(), " but missing (incomplete copy of the dataset?)");
    if (verify_checksums) {
      std::string sum = file_checksum((dir / name).string(), legacy);
      ANDY_CHECK_T(IoError, sum == s["checksum"].get<std::string>(), (dir / name).string(),
                   ": checksum ", sum, " differs from ", s["checksum"].get<std::string>(), " in ",
                   manifest.string(), " (corrupt or modified shard)");
    }
  }
  for (const auto& name : present) {
    ANDY_CHECK_T(IoError, listed.count(name), (dir / name).string(), ": not listed in ",
                 manifest.string(),
                 " (left over from another run? remove it or rerun preprocess with --overwrite)");
  }
}

}  // namespace

std::vector<std::string> resolve_split(const std::string& split, bool verify_checksums) {
  ANDY_CHECK_T(ConfigError, !split.empty(),
               "data split: empty path (set data.train_file / --train_file)");
  if (split.find_first_of("*?[") != std::string::npos) {
    glob_t g{};
    int rc = glob(split.c_str(), 0, nullptr, &g);
    std::vector<std::string> out;
    if (rc == 0) {
      for (size_t i = 0; i < g.gl_pathc; ++i) {
        if (fs::is_regular_file(g.gl_pathv[i])) out.push_back(g.gl_pathv[i]);
      }
    }
    globfree(&g);
    ANDY_CHECK_T(ConfigError, !out.empty(), "data split ", split, ": the glob matches no file");
    std::sort(out.begin(), out.end());
    return out;
  }
  fs::path p = fs::path(split).lexically_normal();
  if (p.has_filename() == false) p = p.parent_path();  // "dir/" -> "dir"
  if (fs::is_directory(p)) {
    auto files = shards_in_dir(p);
    ANDY_CHECK_T(ConfigError, files.empty() == false || !fs::exists(p.parent_path() / ".preprocess-tmp"), "data split ",
                 split, ": holds no finished shard: the andyllm preprocess run writing ", p.parent_path().string(),
                 " did not finish (its .preprocess-tmp/ is still there); run it again (it cleans up the unfinished run)");
    ANDY_CHECK_T(ConfigError, !files.empty(), "data split ", split,
                 ": directory holds no .h5 shard");
    check_manifest(p, files, verify_checksums);
    return files;
  }
  if (fs::is_regular_file(p)) return {p.string()};
  for (const char* ext : {".h5", ".hdf5", ".bin"}) {
    if (ends_with(p.string(), ext)) {
      fs::path dir = p.string().substr(0, p.string().size() - std::string(ext).size());
      if (fs::is_directory(dir)) return resolve_split(dir.string(), verify_checksums);
    }
  }
  ANDY_THROW(ConfigError, "data split ", split,
             ": no such file or directory (expected a split directory from andyllm preprocess, a "
             "glob, or a .h5 shard)");
}

DataLoader::DataLoader(const LoaderOptions& opts, LoaderCursor start)
    : opts_(opts), cursor_(start) {
  ANDY_CHECK_T(ConfigError, opts_.seq_len >= 1, "data.seq_len ", opts_.seq_len, ": expected >= 1");
  ANDY_CHECK_T(ConfigError, opts_.batch_size >= 1, "batch_size ", opts_.batch_size,
               ": expected >= 1");
  ANDY_CHECK_T(
      ConfigError, opts_.dp_size >= 1 && opts_.dp_rank >= 0 && opts_.dp_rank < opts_.dp_size,
      "dp_rank ", opts_.dp_rank, " / dp_size ", opts_.dp_size, ": expected 0 <= dp_rank < dp_size");
  ANDY_CHECK_T(ConfigError, opts_.prefetch_batches >= 0, "data.prefetch_batches ",
               opts_.prefetch_batches, ": expected >= 0");
  ANDY_CHECK_T(ConfigError, start.epoch >= 0 && start.position >= 0, "data cursor (", start.epoch,
               ", ", start.position, "): expected non-negative epoch and position");
  for (const auto& f : resolve_split(opts_.split, opts_.verify_checksums)) {
    readers_.push_back(std::make_unique<ShardReader>(f));
    const ShardInfo& info = readers_.back()->info();
    if (opts_.expected_vocab_size > 0) {
      ANDY_CHECK_T(
          ConfigError, info.vocab_size == opts_.expected_vocab_size, f, ": shard vocab_size ",
          info.vocab_size, " differs from the run's vocabulary ([model] vocab_size = ",
          opts_.expected_vocab_size, "): set [model] vocab_size = ", info.vocab_size,
          " for these shards, or rerun andyllm preprocess with the run's tokenizer");
    }
    if (!opts_.tokenizer_checksum.empty()) {
      const std::string& expected =
          info.format_version < 2 && !opts_.tokenizer_checksum_legacy.empty() ? opts_.tokenizer_checksum_legacy
                                                                              : opts_.tokenizer_checksum;
      ANDY_CHECK_T(ConfigError, info.tokenizer_checksum == expected, f,
                   ": shard tokenizer checksum ", info.tokenizer_checksum,
                   " differs from the run's tokenizer (", expected,
                   "): these shards were tokenized with another tokenizer.model");
    }
    if (!infos_.empty()) {
      ANDY_CHECK_T(ConfigError,
                   info.vocab_size == infos_[0].vocab_size &&
                       info.tokenizer_checksum == infos_[0].tokenizer_checksum,
                   f, ": vocab size / tokenizer checksum differ from ", infos_[0].path,
                   ": the split mixes shards of two tokenizers");
    }
    infos_.push_back(info);
    starts_.push_back(total_tokens_);
    total_tokens_ += info.token_count;
  }
  starts_.push_back(total_tokens_);
  windows_ = total_tokens_ > 1 ? (total_tokens_ - 1) / opts_.seq_len : 0;
  steps_per_epoch_ = windows_ / global_batch();
  ANDY_CHECK_T(ConfigError, steps_per_epoch_ >= 1, "data split ", opts_.split, " has ",
               total_tokens_, " tokens = ", windows_,
               " windows of seq_len + 1 = ", opts_.seq_len + 1,
               " tokens: fewer than one global batch of ", global_batch(), " windows (batch_size ",
               opts_.batch_size, " x data-parallel ranks ", opts_.dp_size,
               "); use more data, a smaller batch or a shorter seq_len");
  ANDY_CHECK_T(ConfigError, cursor_.position <= steps_per_epoch_, "data cursor position ",
               cursor_.position, " exceeds steps_per_epoch ", steps_per_epoch_,
               " (checkpoint from another dataset or batch size?)");
  if (cursor_.position == steps_per_epoch_) cursor_ = {cursor_.epoch + 1, 0};
  start_thread();
}

DataLoader::~DataLoader() { stop_thread(); }

int64_t DataLoader::window_at(int64_t epoch, int64_t step, int dp_rank, int64_t row) const {
  uint64_t pos = static_cast<uint64_t>(step * global_batch() + dp_rank * opts_.batch_size + row);
  if (!opts_.shuffle) return static_cast<int64_t>(pos);
  IndexPermutation perm(static_cast<uint64_t>(windows_),
                        mix64(opts_.seed) ^ mix64(~static_cast<uint64_t>(epoch)));
  return static_cast<int64_t>(perm(pos));
}

void DataLoader::check_ids(size_t shard, int64_t offset, int64_t n, const int64_t* ids) const {
  const int64_t vocab = infos_[shard].vocab_size;
  for (int64_t i = 0; i < n; ++i)
    ANDY_CHECK_T(IoError, ids[i] >= 0 && ids[i] < vocab, infos_[shard].path, ": token id ", ids[i],
                 " at token offset ", offset + i, " is outside the vocabulary 0..", vocab - 1,
                 " (corrupt shard; rerun andyllm preprocess or restore the file)");
}

void DataLoader::read_tokens(int64_t offset, int64_t count, int64_t* out) const {
  ANDY_CHECK(offset >= 0 && offset + count <= total_tokens_, "read_tokens outside the split");
  while (count > 0) {
    size_t s = std::upper_bound(starts_.begin(), starts_.end(), offset) - starts_.begin() - 1;
    int64_t in_shard = offset - starts_[s];
    int64_t n = std::min(count, infos_[s].token_count - in_shard);
    readers_[s]->read(in_shard, n, out);
    if (opts_.check_token_ids) check_ids(s, in_shard, n, out);
    out += n;
    offset += n;
    count -= n;
  }
}

LoaderCursor DataLoader::advance(LoaderCursor c) const {
  if (++c.position >= steps_per_epoch_) return {c.epoch + 1, 0};
  return c;
}

Batch DataLoader::make_batch(LoaderCursor c) const {
  const int64_t B = opts_.batch_size, L = opts_.seq_len;
  Batch b;
  b.cursor = c;
  auto buf = torch::empty({B, L + 1}, torch::kInt64);
  int64_t* p = buf.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) {
    int64_t w = window_at(c.epoch, c.position, opts_.dp_rank, r);
    b.windows.push_back(w);
    read_tokens(w * L, L + 1, p + r * (L + 1));
  }
  b.input = buf.narrow(1, 0, L).contiguous();
  b.target = buf.narrow(1, 1, L).contiguous();
  return b;
}

void DataLoader::producer_loop(LoaderCursor from) {
  LoaderCursor c = from;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || static_cast<int64_t>(queue_.size()) < opts_.prefetch_batches;
      });
      if (stop_) return;
    }
    Item item;
    auto t0 = std::chrono::steady_clock::now();
    try {
      item.batch = make_batch(c);
    } catch (...) {
      item.error = std::current_exception();
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.read_seconds += dt;
      stats_.batches_read += 1;
      bool failed = static_cast<bool>(item.error);
      queue_.push_back(std::move(item));
      cv_.notify_all();
      if (failed) return;
    }
    c = advance(c);
  }
}

void DataLoader::start_thread() {
  if (opts_.prefetch_batches == 0) return;
  stop_ = false;
  LoaderCursor from = cursor_;
  thread_ = std::thread([this, from] { producer_loop(from); });
}

void DataLoader::stop_thread() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  queue_.clear();
}

void DataLoader::seek(LoaderCursor c) {
  ANDY_CHECK_T(ConfigError, c.epoch >= 0 && c.position >= 0 && c.position <= steps_per_epoch_,
               "data cursor (", c.epoch, ", ", c.position,
               "): expected 0 <= position <= steps_per_epoch ", steps_per_epoch_);
  stop_thread();
  cursor_ = c.position == steps_per_epoch_ ? LoaderCursor{c.epoch + 1, 0} : c;
  start_thread();
}

Batch DataLoader::next_batch() {
  Batch b;
  if (opts_.prefetch_batches == 0) {
    auto t0 = std::chrono::steady_clock::now();
    b = make_batch(cursor_);
    std::lock_guard<std::mutex> lock(mu_);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.read_seconds += dt;
    stats_.wait_seconds += dt;
    stats_.batches_read += 1;
  } else {
    auto t0 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty(); });
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.wait_seconds += waited;
    if (stats_.batches_served == 0)
      stats_.first_wait_seconds = waited;
    else
      stats_.max_wait_seconds = std::max(stats_.max_wait_seconds, waited);
    // A failed read stays at the front: every later call rethrows it instead of waiting.
    if (queue_.front().error) std::rethrow_exception(queue_.front().error);
    Item item = std::move(queue_.front());
    queue_.pop_front();
    cv_.notify_all();
    b = std::move(item.batch);
  }
  ANDY_CHECK(b.cursor == cursor_, "data loader: read-ahead out of order");
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.batches_served += 1;
  }
  cursor_ = advance(cursor_);
  return b;
}

LoaderStats DataLoader::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace andy::data
