// Transparent-huge-page mappings (see huge_pages.h).
#include "core/base/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>

namespace andy {

namespace {
size_t mapped_size(size_t bytes) { return (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes; }
}  // namespace

void* alloc_huge_pages(size_t bytes) {
  const size_t size = mapped_size(bytes == 0 ? 1 : bytes);
  // Map one huge page more than needed, then unmap the slop before the first 2 MiB boundary
  // and after the end, so the buffer starts on a huge-page boundary.
  void* raw = mmap(nullptr, size + kHugePageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + size + kHugePageBytes;
  if (end > aligned + size) munmap(reinterpret_cast<void*>(aligned + size), end - (aligned + size));
  void* p = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
#endif
  return p;
}

void free_huge_pages(void* p, size_t bytes) {
  if (p) munmap(p, mapped_size(bytes == 0 ? 1 : bytes));
}

}  // namespace andy
