// Memory on transparent huge pages (2 MiB) for a large buffer read all over every engine
// step: the paged KV cache (core/model/kv_cache.h). With 4 KiB pages, a decode step that reads a
// few MiB of cache blocks spread through the pool keeps missing the TLB (measured: 11-17 % of the
// CPU decode attention's time, docs/PERFORMANCE.md). Linux maps the buffer with huge pages when
// /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`; with `never`, or
// elsewhere, the same calls give ordinary zeroed pages.
#pragma once

#include <cstddef>

namespace andy {

// An anonymous mapping of at least `bytes` bytes, zeroed, aligned to 2 MiB and advised
// MADV_HUGEPAGE; pages are faulted in on first touch. Returns nullptr when the system has no
// memory to map. Release with free_huge_pages(p, bytes) (the same `bytes`). Thread-safe.
void* alloc_huge_pages(size_t bytes);
void free_huge_pages(void* p, size_t bytes);

// 2 MiB: the alignment and size granule of alloc_huge_pages.
constexpr size_t kHugePageBytes = size_t{2} << 20;

}  // namespace andy
