// ShmAllReduce: an all-reduce of fp32 buffers through shared memory, for a communicator whose
// ranks all run on one node (the tensor-parallel group of CPU serving and training), as vLLM's
// and DeepSpeed's CPU backends do for their TP all-reduce. Each rank copies its buffer into its
// own slot of a segment every rank maps, publishes the operation's sequence number, and, once
// every rank has published it, sums the slots in rank order into its buffer: every rank gets
// the same bits, and no message, progress engine or thread sits between the ranks. Larger
// buffers go in pieces of the slot size (MpiCommunicator). Measured against Open MPI's
// blocking and nonblocking all-reduces: docs/PERFORMANCE.md.
//
// Operations are numbered in issue order and complete in that order; each uses slot
// seq % kSlots of every rank. Before a rank overwrites a slot it waits until every rank has
// finished reading that slot's previous operation (it completes its own earlier operations
// itself meanwhile), so up to kSlots - 1 operations may be issued ahead of their waits. Every
// rank must issue the same operations in the same order, as for any collective. Waiting spins,
// then yields the core, then sleeps (ranks may share cores), and gives up at a deadline.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

#include "parallel/communicator.h"
#include "parallel/mpi_utils.h"

namespace andy {

class ShmAllReduce {
 public:
  static constexpr int kSlots = 4;
  using Deadline = std::chrono::steady_clock::time_point;

  // Collective over `comm`. Null (on every rank) when its ranks do not all share this node's
  // memory, when capacity_bytes is 0, or when the segment cannot be made (no /dev/shm, or less
  // room left there than the segment's ranks x kSlots x capacity bytes, reserved at once).
  // capacity_bytes: the largest buffer it takes (rounded up to 4 KB).
  static std::unique_ptr<ShmAllReduce> create(MPI_Comm comm, int64_t capacity_bytes);
  ~ShmAllReduce();
  ShmAllReduce(const ShmAllReduce&) = delete;
  ShmAllReduce& operator=(const ShmAllReduce&) = delete;

  int64_t capacity_elements() const { return capacity_ / static_cast<int64_t>(sizeof(float)); }

  // Copies n <= capacity_elements() floats from `data` into this rank's slot and publishes them;
  // the result goes to `out` (n floats inside `owner`, which the operation keeps alive until it
  // completes, waited or not), which may be `data`. Returns the operation's number, or 0 when
  // the deadline passed while waiting for the ranks to release the slot (nothing was issued).
  uint64_t post(const float* data, int64_t n, ReduceOp op, float* out, const at::Tensor& owner,
                Deadline deadline);
  // Completes every operation up to `seq` in order. False when the deadline passed first (call
  // again to go on waiting).
  bool complete(uint64_t seq, Deadline deadline);
  // Non-blocking: completes `seq` (and those before it) if every rank has published them.
  bool try_complete(uint64_t seq);

 private:
  struct Pending {
    uint64_t seq;
    float* out;
    int64_t n;
    ReduceOp op;
    at::Tensor owner;  // keeps `out` alive
  };
  ShmAllReduce(void* base, size_t bytes, int rank, int size, int64_t capacity);
  struct alignas(64) Flag;
  Flag& posted(int r) const;
  Flag& done(int r) const;
  const float* slot(int r, uint64_t seq) const;
  // Waits until every rank's flag (posted or done) is at least `seq`; false at the deadline.
  bool wait_all(bool use_posted, uint64_t seq, Deadline deadline, bool block) const;
  bool complete_locked(uint64_t seq, Deadline deadline, bool block);

  void* base_;
  size_t bytes_;
  int rank_, size_;
  int64_t capacity_;
  uint64_t issued_ = 0;  // the last operation posted
  std::deque<Pending> pending_;
  std::mutex mu_;
};

}  // namespace andy
