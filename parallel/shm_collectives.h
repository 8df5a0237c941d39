// ShmCollectives: all-reduce, all-gather and reduce-scatter through shared memory, for a
// communicator whose ranks all run on one node, as vLLM's and DeepSpeed's CPU backends do for
// their tensor-parallel all-reduce. Each rank copies its buffer into its own slot of a segment
// every rank maps and publishes the operation's sequence number; once every rank has published
// it, each rank computes its result from the slots (sums in rank order: every rank gets the
// same bits). No message, progress engine or thread sits between the ranks. Measured against
// Open MPI's blocking and nonblocking collectives: docs/PERFORMANCE.md, "Collectives".
//
// Operations are numbered in issue order and complete in that order; each uses slot
// seq % kSlots of every rank. Before a rank overwrites a slot it waits until every rank has
// finished reading that slot's previous operation (it completes its own earlier operations
// itself meanwhile), so operations may be issued ahead of their waits without limit as long as
// every rank issues the same operations in the same order, as for any collective. Waiting
// spins, then yields the core, then sleeps (ranks may share cores), and gives up at a deadline.
//
// Direct operations (post_direct) copy nothing into the segment: each rank publishes the address
// of its buffer, and each rank reads the others' buffers straight from their memory with Linux's
// cross-memory attach (process_vm_readv), one copy where the slots take two, as Open MPI's
// shared-memory transport does for large messages. Such an operation completes on a rank only
// once every rank has finished reading it, since the caller may reuse its buffer then. They
// need every rank to be allowed to read every other's memory (the ptrace rules: same user, and
// Yama or a container may forbid it); create() checks that, and direct_available() says.
// ANDYLLM_MPI_SHM_DIRECT=0 turns them off.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/mpi_utils.h"

namespace andy {

class ShmCollectives {
 public:
  static constexpr int kSlots = 4;
  using Deadline = std::chrono::steady_clock::time_point;
  // Computes this rank's result once every rank has posted: slot(r) is what rank r posted.
  using Combine = std::function<void(const std::function<const void*(int)>& slot)>;

  // Collective over `comm`. Null (on every rank) when its ranks do not all share this node's
  // memory, when capacity_bytes is 0, or when the segment cannot be made (no /dev/shm, or less
  // room left there than the segment's ranks x kSlots x capacity bytes, reserved at once).
  // capacity_bytes: the most one rank posts per operation (rounded up to 4 KB).
  static std::unique_ptr<ShmCollectives> create(MPI_Comm comm, int64_t capacity_bytes);
  ~ShmCollectives();
  ShmCollectives(const ShmCollectives&) = delete;
  ShmCollectives& operator=(const ShmCollectives&) = delete;

  int64_t capacity_bytes() const { return capacity_; }
  int size() const { return size_; }
  // True when every rank can read every other's memory: post_direct may be used.
  bool direct_available() const { return direct_; }

  // Copies `bytes` <= capacity_bytes() from `data` into this rank's slot and publishes them;
  // `combine` runs when the operation completes. `owner` (the tensors combine writes or reads
  // besides the slots) is kept alive until then, waited or not. Returns the operation's number,
  // or 0 when the deadline passed while waiting for the ranks to release the slot (nothing was
  // issued then).
  uint64_t post(const void* data, int64_t bytes, Combine combine, std::vector<at::Tensor> owner,
                Deadline deadline);
  // A direct operation: publishes `data` (`bytes` long, any size) in place. `combine` gets a
  // reader, read(r, offset, dst, n), that copies n bytes from offset of rank r's buffer into dst
  // (memcpy for this rank's own). `data` must stay unchanged, and `owner` keeps it alive, until
  // the operation completes. Only when direct_available(). Returns as post() does.
  using Reader = std::function<void(int r, int64_t offset, void* dst, int64_t n)>;
  using DirectCombine = std::function<void(const Reader& read)>;
  uint64_t post_direct(const void* data, int64_t bytes, DirectCombine combine, std::vector<at::Tensor> owner,
                       Deadline deadline);
  // Completes every operation up to `seq` in order. False when the deadline passed first (call
  // again to go on waiting).
  bool complete(uint64_t seq, Deadline deadline);
  // Non-blocking: completes `seq` (and those before it) if every rank has published them.
  bool try_complete(uint64_t seq);

  // out[i] = in[0][i] op in[1][i] op ... in rank order (kAvg: the sum over in.size()).
  static void reduce(float* out, const std::vector<const float*>& in, int64_t n, ReduceOp op);

 private:
  struct Pending {
    uint64_t seq;
    Combine combine;              // slot operations
    DirectCombine direct;         // direct operations (their buffers: the slot's Descriptor)
    bool combined = false;        // this rank has its result (a direct one: peers may still read)
    std::vector<at::Tensor> owner;
  };
  struct alignas(64) Flag;
  struct Peer;  // a rank's process id and address of its segment (for direct reads)
  ShmCollectives(void* base, size_t bytes, int64_t header, int rank, int size, int64_t capacity, bool direct);
  uint64_t post_locked(Pending pending, const void* slot_data, int64_t slot_bytes, Deadline deadline);
  // A direct operation's read: n bytes at offset of rank r's buffer (this rank's too).
  void read_part(int r, uint64_t seq, int64_t offset, void* dst, int64_t n) const;
  Flag& posted(int r) const;
  Peer& peer(int r) const;
  Flag& done(int r) const;
  char* slot(int r, uint64_t seq) const;
  // Waits until every rank's flag (posted or done) is at least `seq`; false at the deadline.
  bool wait_all(bool use_posted, uint64_t seq, Deadline deadline, bool block) const;
  bool complete_locked(uint64_t seq, Deadline deadline, bool block);

  void* base_;
  char* slots_;  // after the flags' header
  size_t bytes_;
  int rank_, size_;
  int64_t capacity_;
  bool direct_;
  uint64_t issued_ = 0;  // the last operation posted
  std::deque<Pending> pending_;
  std::mutex mu_;
};

}  // namespace andy
