// Shared-memory collectives (see shm_collectives.h). The segment: one 192-byte header per rank
// (the last operation it posted, the last it completed, its process id and the address at
// which it mapped the segment; a cache line each), then kSlots slots of capacity bytes per
// rank. A direct operation's slot holds only the address and size of the rank's buffer.
#include "parallel/shm_collectives.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "core/base/error.h"

namespace andy {

struct alignas(64) ShmCollectives::Flag {
  std::atomic<uint64_t> value;
};

struct alignas(64) ShmCollectives::Peer {
  int64_t pid;
  uint64_t base;  // where that rank mapped the segment
};

namespace {

constexpr int64_t kPage = 4096;
constexpr size_t kHeaderPerRank = 192;  // posted, done, peer: a cache line each

// What a direct operation's slot holds.
struct Descriptor {
  uint64_t addr;
  int64_t bytes;
};

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Copies n bytes at `addr` in process `pid` into dst; 0 or the errno of the failure.
int cma_read(int64_t pid, uint64_t addr, void* dst, int64_t n) {
  char* out = static_cast<char*>(dst);
  while (n > 0) {
    iovec local{out, static_cast<size_t>(n)};
    iovec remote{reinterpret_cast<void*>(addr), static_cast<size_t>(n)};
    const ssize_t got = process_vm_readv(static_cast<pid_t>(pid), &local, 1, &remote, 1, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (got == 0) return EFAULT;
    out += got;
    addr += static_cast<uint64_t>(got);
    n -= got;
  }
  return 0;
}

}  // namespace

std::unique_ptr<ShmCollectives> ShmCollectives::create(MPI_Comm comm, int64_t capacity_bytes) {
  if (capacity_bytes <= 0) return nullptr;
  int rank = 0, size = 0;
  MPI_CHECK(MPI_Comm_rank(comm, &rank));
  MPI_CHECK(MPI_Comm_size(comm, &size));
  // Only when every rank shares this node's memory (agreed: every rank takes the same path).
  MPI_Comm local = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local));
  int local_size = 0;
  MPI_CHECK(MPI_Comm_size(local, &local_size));
  MPI_CHECK(MPI_Comm_free(&local));
  int ok = local_size == size;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, comm));
  if (!ok) return nullptr;

  const int64_t capacity = round_up(capacity_bytes, kPage);
  const int64_t header = round_up(static_cast<int64_t>(size * kHeaderPerRank), kPage);
  const size_t bytes = static_cast<size_t>(header + int64_t{size} * kSlots * capacity);
  // Rank 0 makes the segment under a fresh name; the others open it; once all have it mapped,
  // the name is removed, so nothing is left in /dev/shm whatever happens to the job later.
  char name[64] = {0};
  void* base = nullptr;
  if (rank == 0) {
    std::random_device rd;
    std::snprintf(name, sizeof name, "/andyllm-%d-%08x", static_cast<int>(getpid()), rd());
    const int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd >= 0) {
      // The pages are reserved now: a segment larger than what /dev/shm has left (64 MB in a
      // default Docker container) is refused here, not met later as a SIGBUS on first touch.
      struct statvfs fs {};
      const bool room = fstatvfs(fd, &fs) == 0 && static_cast<double>(fs.f_bavail) * fs.f_frsize > 1.25 * bytes;
      if (room && posix_fallocate(fd, 0, static_cast<off_t>(bytes)) == 0) {
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) base = p;
      }
      close(fd);
    }
    if (base) {
      for (int r = 0; r < size; ++r)
        for (int k = 0; k < 2; ++k)
          new (static_cast<char*>(base) + r * kHeaderPerRank + k * 64) Flag{{0}};
    } else {
      shm_unlink(name);
      name[0] = 0;
    }
  }
  MPI_CHECK(MPI_Bcast(name, sizeof name, MPI_CHAR, 0, comm));
  if (rank != 0 && name[0]) {
    const int fd = shm_open(name, O_RDWR, 0600);
    if (fd >= 0) {
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (p != MAP_FAILED) base = p;
      close(fd);
    }
  }
  ok = base != nullptr;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, comm));
  if (rank == 0 && name[0]) shm_unlink(name);
  if (!ok) {
    if (base) munmap(base, bytes);
    return nullptr;
  }
  // Direct reads: every rank publishes its process id and where it mapped the segment, then
  // reads every other rank's record through that rank's memory; all must succeed (and agree).
  auto peer_at = [base](int r) {
    return reinterpret_cast<Peer*>(static_cast<char*>(base) + r * kHeaderPerRank + 128);
  };
  peer_at(rank)->pid = getpid();
  peer_at(rank)->base = reinterpret_cast<uint64_t>(base);
  MPI_CHECK(MPI_Barrier(comm));
  const char* env = std::getenv("ANDYLLM_MPI_SHM_DIRECT");  // "0": slots only
  int direct = !(env && std::string(env) == "0");
  for (int r = 0; r < size && direct; ++r) {
    if (r == rank) continue;
    const Peer expect = *peer_at(r);
    Peer got{};
    direct = cma_read(expect.pid, expect.base + r * kHeaderPerRank + 128, &got, sizeof got) == 0 &&
             got.pid == expect.pid && got.base == expect.base;
  }
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &direct, 1, MPI_INT, MPI_MIN, comm));
  return std::unique_ptr<ShmCollectives>(new ShmCollectives(base, bytes, header, rank, size, capacity, direct != 0));
}

ShmCollectives::ShmCollectives(void* base, size_t bytes, int64_t header, int rank, int size, int64_t capacity,
                               bool direct)
    : base_(base), slots_(static_cast<char*>(base) + header), bytes_(bytes), rank_(rank), size_(size),
      capacity_(capacity), direct_(direct) {}

ShmCollectives::~ShmCollectives() { munmap(base_, bytes_); }

ShmCollectives::Flag& ShmCollectives::posted(int r) const {
  return *reinterpret_cast<Flag*>(static_cast<char*>(base_) + r * kHeaderPerRank);
}

ShmCollectives::Flag& ShmCollectives::done(int r) const {
  return *reinterpret_cast<Flag*>(static_cast<char*>(base_) + r * kHeaderPerRank + 64);
}

ShmCollectives::Peer& ShmCollectives::peer(int r) const {
  return *reinterpret_cast<Peer*>(static_cast<char*>(base_) + r * kHeaderPerRank + 128);
}

char* ShmCollectives::slot(int r, uint64_t seq) const {
  return slots_ + (int64_t{r} * kSlots + static_cast<int64_t>(seq % kSlots)) * capacity_;
}

bool ShmCollectives::wait_all(bool use_posted, uint64_t seq, Deadline deadline, bool block) const {
  // Spin briefly (the ranks usually arrive within microseconds of each other), then yield the
  // core, then sleep: ranks may share cores, and one may be far behind (a prefill elsewhere).
  constexpr int kSpins = 256, kYields = 4096;
  for (int round = 0;; ++round) {
    int r = 0;
    for (; r < size_; ++r) {
      const Flag& f = use_posted ? posted(r) : done(r);
      if (f.value.load(std::memory_order_acquire) < seq) break;
    }
    if (r == size_) return true;
    if (!block) return false;
    if (round >= kSpins && std::chrono::steady_clock::now() >= deadline) return false;
    poll_backoff(round, kSpins, kYields, 4 * kYields);
  }
}

uint64_t ShmCollectives::post(const void* data, int64_t bytes, Combine combine, std::vector<at::Tensor> owner,
                             Deadline deadline) {
  ANDY_CHECK_T(CommError, bytes >= 0 && bytes <= capacity_, "shared-memory collective: ", bytes,
               " bytes exceed its slot of ", capacity_);
  Pending p;
  p.combine = std::move(combine);
  p.owner = std::move(owner);
  std::lock_guard<std::mutex> lock(mu_);
  return post_locked(std::move(p), data, bytes, deadline);
}

uint64_t ShmCollectives::post_direct(const void* data, int64_t bytes, DirectCombine combine,
                                    std::vector<at::Tensor> owner, Deadline deadline) {
  ANDY_CHECK_T(CommError, direct_, "shared-memory collective: direct reads are not available");
  ANDY_CHECK_T(CommError, bytes >= 0, "shared-memory collective: negative size ", bytes);
  Pending p;
  p.direct = std::move(combine);
  p.owner = std::move(owner);
  const Descriptor d{reinterpret_cast<uint64_t>(data), bytes};
  std::lock_guard<std::mutex> lock(mu_);
  return post_locked(std::move(p), &d, sizeof d, deadline);
}

uint64_t ShmCollectives::post_locked(Pending pending, const void* slot_data, int64_t slot_bytes, Deadline deadline) {
  const uint64_t seq = issued_ + 1;
  if (seq > static_cast<uint64_t>(kSlots)) {
    // The slot's previous operation must be read by every rank; ours we complete ourselves.
    const uint64_t prev = seq - kSlots;
    if (!complete_locked(prev, deadline, true) || !wait_all(false, prev, deadline, true)) return 0;
  }
  if (slot_bytes > 0) std::memcpy(slot(rank_, seq), slot_data, static_cast<size_t>(slot_bytes));
  posted(rank_).value.store(seq, std::memory_order_release);
  issued_ = seq;
  pending.seq = seq;
  pending_.push_back(std::move(pending));
  return seq;
}

void ShmCollectives::read_part(int r, uint64_t seq, int64_t offset, void* dst, int64_t n) const {
  if (n <= 0) return;
  const Descriptor d = *reinterpret_cast<const Descriptor*>(slot(r, seq));
  ANDY_CHECK_T(CommError, offset >= 0 && offset + n <= d.bytes, "shared-memory collective: reading ", n,
               " bytes at ", offset, " of rank ", r, "'s buffer of ", d.bytes, " bytes (the ranks disagree on the sizes)");
  if (r == rank_) {
    const char* src = reinterpret_cast<const char*>(d.addr) + offset;
    if (src != dst) std::memcpy(dst, src, static_cast<size_t>(n));  // in place: already there
    return;
  }
  const int err = cma_read(peer(r).pid, d.addr + static_cast<uint64_t>(offset), dst, n);
  ANDY_CHECK_T(CommError, err == 0, "shared-memory collective: reading rank ", r, "'s buffer (process ", peer(r).pid,
               ") failed: ", std::strerror(err));
}

bool ShmCollectives::complete(uint64_t seq, Deadline deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  return complete_locked(seq, deadline, true);
}

bool ShmCollectives::try_complete(uint64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  return complete_locked(seq, Deadline::max(), false);
}

bool ShmCollectives::complete_locked(uint64_t seq, Deadline deadline, bool block) {
  while (!pending_.empty() && pending_.front().seq <= seq) {
    Pending& p = pending_.front();
    if (!p.combined) {
      if (!wait_all(true, p.seq, deadline, block)) return false;
      if (p.direct) {
        p.direct([this, &p](int r, int64_t offset, void* dst, int64_t n) { read_part(r, p.seq, offset, dst, n); });
      } else {
        p.combine([this, &p](int r) -> const void* { return slot(r, p.seq); });
      }
      done(rank_).value.store(p.seq, std::memory_order_release);
      p.combined = true;
    }
    // A direct operation's buffer is read from where the caller keeps it: complete only once
    // every rank has read it.
    if (p.direct && !wait_all(false, p.seq, deadline, block)) return false;
    pending_.pop_front();
  }
  return true;
}

void ShmCollectives::reduce(float* out, const std::vector<const float*>& in, int64_t n, ReduceOp op) {
  // Two inputs at a time into `out`, first in[0] with in[1], then out with in[2], ...
  auto fold = [&](auto f) {
    const float* a = in[0];
    for (size_t r = 1; r < in.size(); ++r) {
      const float* b = in[r];
      for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], b[i]);
      a = out;
    }
    if (in.size() == 1 && out != in[0]) std::memcpy(out, in[0], static_cast<size_t>(n) * sizeof(float));
  };
  switch (op) {
    case ReduceOp::kSum: case ReduceOp::kAvg: fold([](float x, float y) { return x + y; }); break;
    case ReduceOp::kMax: fold([](float x, float y) { return std::max(x, y); }); break;
    case ReduceOp::kMin: fold([](float x, float y) { return std::min(x, y); }); break;
  }
  if (op == ReduceOp::kAvg) {
    const float n_ranks = static_cast<float>(in.size());
    for (int64_t i = 0; i < n; ++i) out[i] /= n_ranks;
  }
}

}  // namespace andy
