// One HDF5 token shard (format version 1):
//   /tokens       1-D uint16 (vocab_size <= 65536) or uint32, chunked, optional gzip+shuffle;
//                 the documents one after another, each ended by eos.
//   /doc_offsets  1-D int64, document_count + 1 entries: document d is tokens[off[d], off[d+1]).
//   attributes on "/": format_version (int64, 1), vocab_size (int64), tokenizer_checksum
//                 (string, data/checksum.h), token_count (int64), document_count (int64),
//                 eos_id (int64), split (string).
// A writer creates "<name>.tmp" and renames it to <name> only after closing it, so a shard
// that exists under its final name is complete.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/hdf5_utils.h"

namespace andy::data {

// Version 2: checksums are standard FNV-1a 64 (version 1 shards and manifests are still read).
constexpr int64_t kShardFormatVersion = 2;

struct ShardInfo {
  std::string path;
  int64_t format_version = 0;
  int64_t vocab_size = 0;
  std::string tokenizer_checksum;
  int64_t token_count = 0;
  int64_t document_count = 0;
  int64_t eos_id = -1;
  std::string split;
  int token_bytes = 0;  // 2 (uint16) or 4 (uint32)
};

struct ShardWriteOptions {
  int64_t chunk_tokens = 65536;  // HDF5 chunk length. Default: 65536
  int compression = 0;           // gzip level 0..9; 0 (default) stores chunks uncompressed
};

struct ShardSummary {
  std::string path;
  int64_t tokens = 0;
  int64_t documents = 0;
  std::string checksum;  // file_checksum() of the finished file
};

// Buffers one shard in memory and writes it on finish(). Not thread-safe.
class ShardWriter {
 public:
  ShardWriter(std::string path, std::string split, int64_t vocab_size,
              std::string tokenizer_checksum, int64_t eos_id, ShardWriteOptions opts = {});
  // Appends one document's ids (the caller includes the trailing eos).
  void add_document(const int32_t* ids, size_t n);
  int64_t tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t documents() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  // Writes <path>.tmp, closes it, renames it to <path>. Throws IoError naming the file.
  ShardSummary finish();

 private:
  std::string path_, split_, checksum_;
  int64_t vocab_size_, eos_id_;
  ShardWriteOptions opts_;
  std::vector<uint32_t> tokens_;
  std::vector<int64_t> offsets_{0};
};

// An open shard for reading. Construction validates the file (HDF5 structure, attributes,
// dataset lengths agreeing with token_count / document_count) and throws IoError naming the
// file when it is truncated, corrupt or of another format version. Thread-safe (every HDF5
// call holds hdf5_mutex()).
class ShardReader {
 public:
  explicit ShardReader(const std::string& path);
  ~ShardReader();  // closes the file under hdf5_mutex()
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  const ShardInfo& info() const { return info_; }
  // tokens[offset, offset + count) converted to int64. Throws IoError naming the file.
  void read(int64_t offset, int64_t count, int64_t* out) const;
  std::vector<int64_t> read_all() const;
  std::vector<int64_t> doc_offsets() const;

 private:
  ShardInfo info_;
  H5Handle file_, tokens_;
};

}  // namespace andy::data
