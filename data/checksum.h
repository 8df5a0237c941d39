// Checksums used in shard attributes and manifest.json: 64-bit FNV-1a, written as
// "fnv1a64:<16 hex digits>". Not cryptographic: it detects truncation, corruption and a
// different tokenizer file, which is all the data layer asks of it.
// Shards and manifests of format version 1 were written with a wrong offset basis
// (1469598103934665603, a digit short of FNV's 14695981039346656037); `legacy` reproduces it so
// they still verify.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace andy::data {

class Fnv1a64 {
 public:
  static constexpr uint64_t kOffsetBasis = 14695981039346656037ULL;  // FNV-1a 64
  static constexpr uint64_t kLegacyOffsetBasis = 1469598103934665603ULL;  // format version 1
  explicit Fnv1a64(bool legacy = false) : h_(legacy ? kLegacyOffsetBasis : kOffsetBasis) {}
  void update(const void* data, size_t n);
  uint64_t value() const { return h_; }
  std::string hex() const;  // "fnv1a64:0123456789abcdef"

 private:
  uint64_t h_;
};

// Checksum of a whole file. Throws IoError (naming the file) when it cannot be read.
std::string file_checksum(const std::string& path, bool legacy = false);

}  // namespace andy::data
