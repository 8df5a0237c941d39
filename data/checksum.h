// Checksums used in shard attributes and manifest.json: 64-bit FNV-1a, written as
// "fnv1a64:<16 hex digits>". Not cryptographic: it detects truncation, corruption and a
// different tokenizer file, which is all the data layer asks of it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace andy::data {

class Fnv1a64 {
 public:
  void update(const void* data, size_t n);
  uint64_t value() const { return h_; }
  std::string hex() const;  // "fnv1a64:0123456789abcdef"

 private:
  uint64_t h_ = 1469598103934665603ULL;
};

// Checksum of a whole file. Throws IoError (naming the file) when it cannot be read.
std::string file_checksum(const std::string& path);

}  // namespace andy::data
