// FNV-1a 64 over bytes and files.
#include "data/checksum.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/base/error.h"

namespace andy::data {

void Fnv1a64::update(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = h_;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ULL;
  }
  h_ = h;
}

std::string Fnv1a64::hex() const {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "fnv1a64:%016llx", static_cast<unsigned long long>(h_));
  return buf;
}

std::string file_checksum(const std::string& path, bool legacy) {
  FILE* f = std::fopen(path.c_str(), "rb");
  ANDY_CHECK_T(IoError, f, path, ": cannot open for checksum: ", std::strerror(errno));
  Fnv1a64 h(legacy);
  std::vector<char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) h.update(buf.data(), n);
  bool bad = std::ferror(f);
  std::fclose(f);
  ANDY_CHECK_T(IoError, !bad, path, ": read error while computing its checksum");
  return h.hex();
}

}  // namespace andy::data
