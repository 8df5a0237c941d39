// Multi-rank tests of the MPI Communicator (run by ctest under mpirun -np 2, 3 and 4).
// Results are checked against closed-form values for every dtype and op, sizes that do not
// divide by the world size, empty tensors, uneven counts, sub-group communicators of the grid,
// asynchronous overlap, issue order with many collectives in flight (on the communication thread
// and on the nonblocking fallback), the timeout and the argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>

#include "core/base/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_grid.h"
#include "parallel/shm_collectives.h"
#include "tests/mpi_test_main.h"

using namespace andy;

namespace {

const std::vector<at::ScalarType> kAllTypes = {at::kFloat, at::kDouble, at::kBFloat16,
                                               at::kHalf,  at::kInt,    at::kLong};
const std::vector<int64_t> kSizes = {1, 7, 1023, 4099};

// Small integers: exact in every dtype (bf16 holds integers up to 256 exactly).
at::Tensor pattern(int64_t n, double add, int64_t mod, at::ScalarType t) {
  return (at::arange(n, at::kLong).remainder(mod).to(at::kDouble) + add).to(t);
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

}  // namespace

TEST(Collectives, AllReduceEveryDtypeAndOp) {
  auto comm = test_world_comm();
  const int n = comm->size(), r = comm->rank();
  for (auto t : kAllTypes) {
    for (int64_t size : kSizes) {
      // sum
      auto x = pattern(size, r + 1, 5, t);
      comm->all_reduce(x, {ReduceOp::kSum})->wait();
      auto expect = pattern(size, 0, 5, at::kDouble) * n + n * (n + 1) / 2.0;
      EXPECT_EQ(max_abs_diff(x, expect), 0) << "sum " << t << " size " << size;
      // max / min: rank r contributes r*(i%3)
      auto y = pattern(size, 0, 3, at::kDouble).mul(r).to(t);
      auto z = y.clone();
      comm->all_reduce(y, {ReduceOp::kMax})->wait();
      comm->all_reduce(z, {ReduceOp::kMin})->wait();
      EXPECT_EQ(max_abs_diff(y, pattern(size, 0, 3, at::kDouble) * (n - 1)), 0) << "max " << t;
      EXPECT_EQ(max_abs_diff(z, at::zeros({size}, at::kDouble)), 0) << "min " << t;
      // avg (floating types only): mean of (r+1)*2 = n+1
      if (at::isFloatingType(t)) {
        auto w = at::full({size}, 2.0 * (r + 1), at::kDouble).to(t);
        comm->all_reduce(w, {ReduceOp::kAvg})->wait();
        EXPECT_EQ(max_abs_diff(w, at::full({size}, n + 1.0, at::kDouble)), 0) << "avg " << t;
      }
    }
  }
}

TEST(Collectives, NarrowFloatSumIsRoundedOnce) {
  // 1 + n * 2^-9: each partial sum in bf16 would round away the small terms; fp32 staging keeps
  // them until the final rounding, so every rank gets the same correctly rounded value.
  auto comm = test_world_comm();
  const int n = comm->size();
  auto x = at::full({5}, comm->rank() == 0 ? 1.0 : std::ldexp(1.0, -9), at::kBFloat16);
  comm->all_reduce(x, {ReduceOp::kSum})->wait();
  double exact = 1.0 + (n - 1) * std::ldexp(1.0, -9);
  double expect = at::full({1}, exact, at::kDouble).to(at::kBFloat16).to(at::kDouble).item<double>();
  EXPECT_EQ(x.to(at::kDouble)[0].item<double>(), expect);
}

TEST(Collectives, AllGatherEqualAndUneven) {
  auto comm = test_world_comm();
  const int n = comm->size(), r = comm->rank();
  for (auto t : kAllTypes) {
    for (int64_t size : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{1001}}) {
      auto in = pattern(size, 4.0 * r, 4, t);
      auto out = at::zeros({size * n}, t);
      comm->all_gather(out, in)->wait();
      std::vector<at::Tensor> parts;
      for (int q = 0; q < n; ++q) parts.push_back(pattern(size, 4.0 * q, 4, at::kDouble));
      EXPECT_EQ(max_abs_diff(out, at::cat(parts)), 0) << t << " size " << size;
    }
    // Uneven shares: rank q holds q + 2 elements (e.g. a vocab that does not split evenly).
    std::vector<int64_t> counts;
    for (int q = 0; q < n; ++q) counts.push_back(q + 2);
    int64_t total = 0;
    for (auto c : counts) total += c;
    auto in = pattern(counts[r], 4.0 * r, 4, t);
    auto out = at::zeros({total}, t);
    comm->all_gather(out, in, {counts})->wait();
    std::vector<at::Tensor> parts;
    for (int q = 0; q < n; ++q) parts.push_back(pattern(counts[q], 4.0 * q, 4, at::kDouble));
    EXPECT_EQ(max_abs_diff(out, at::cat(parts)), 0) << "uneven " << t;
  }
}

TEST(Collectives, ReduceScatterEqualAndUneven) {
  auto comm = test_world_comm();
  const int n = comm->size(), r = comm->rank();
  const double tri = n * (n + 1) / 2.0;
  for (auto t : kAllTypes) {
    for (int64_t shard : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{513}}) {
      auto in = pattern(shard * n, r + 1, 5, t);
      auto out = at::zeros({shard}, t);
      comm->reduce_scatter(out, in, {ReduceOp::kSum, {}})->wait();
      auto expect = pattern(shard * n, 0, 5, at::kDouble).narrow(0, r * shard, shard) * n + tri;
      EXPECT_EQ(max_abs_diff(out, expect), 0) << t << " shard " << shard;
    }
    // Uneven: total 2n+1 elements (not divisible by n), rank q receives counts[q].
    std::vector<int64_t> counts(n, 2);
    counts[n - 1] = 3;
    int64_t off = 2 * r;
    auto in = pattern(2 * n + 1, r + 1, 5, t);
    auto out = at::zeros({counts[r]}, t);
    comm->reduce_scatter(out, in, {ReduceOp::kMax, counts})->wait();
    auto expect = pattern(2 * n + 1, n, 5, at::kDouble).narrow(0, off, counts[r]);
    EXPECT_EQ(max_abs_diff(out, expect), 0) << "uneven max " << t;
    if (at::isFloatingType(t)) {
      auto avg_in = at::full({2 * n + 1}, 2.0 * (r + 1), at::kDouble).to(t);
      auto avg_out = at::zeros({counts[r]}, t);
      comm->reduce_scatter(avg_out, avg_in, {ReduceOp::kAvg, counts})->wait();
      EXPECT_EQ(max_abs_diff(avg_out, at::full({counts[r]}, n + 1.0, at::kDouble)), 0) << "avg " << t;
    }
  }
}

TEST(Collectives, BroadcastFromEveryRoot) {
  auto comm = test_world_comm();
  const int n = comm->size(), r = comm->rank();
  for (auto t : kAllTypes) {
    for (int root = 0; root < n; ++root) {
      for (int64_t size : {int64_t{0}, int64_t{1}, int64_t{777}}) {
        auto x = r == root ? pattern(size, root + 1, 7, t) : at::zeros({size}, t);
        comm->broadcast(x, root)->wait();
        EXPECT_EQ(max_abs_diff(x, pattern(size, root + 1, 7, at::kDouble)), 0) << t << " root " << root;
      }
    }
  }
}

// Gather to each root, on the communication thread and on the nonblocking path (the serving
// engine's TP communicators): the root gets every rank's input in rank order, the other ranks'
// output is left untouched; a root outside the group is refused on every rank, an output of the
// wrong size on the root.
TEST(Collectives, GatherToEveryRoot) {
  for (bool thread : {true, false}) {
    auto comm = make_communicator(Backend::kMpi, MpiComm(MPI_COMM_WORLD, false), thread ? "gather[thread]" : "gather",
                                  -1, std::chrono::milliseconds(60000), thread);
    const int n = comm->size(), r = comm->rank();
    for (auto t : kAllTypes) {
      for (int root = 0; root < n; ++root) {
        for (int64_t size : {int64_t{0}, int64_t{1}, int64_t{777}}) {
          const at::Tensor in = pattern(size, 10 * r + 1, 7, t).view({1, size});
          at::Tensor out = r == root ? at::full({n, size}, -1, t) : at::full({3}, -5, t);
          comm->gather(out, in, root)->wait();
          if (r == root) {
            for (int q = 0; q < n; ++q)
              EXPECT_EQ(max_abs_diff(out[q], pattern(size, 10 * q + 1, 7, at::kDouble)), 0)
                  << t << " root " << root << " from " << q << (thread ? " (thread)" : "");
          } else {
            EXPECT_EQ(max_abs_diff(out, at::full({3}, -5, at::kDouble)), 0) << "not the root's output";
          }
        }
      }
    }
    at::Tensor in = at::ones({3}), out = at::zeros({3 * n + (r == 0 ? 1 : 0)});
    EXPECT_THROW(comm->gather(out, in, n), CommError);
    if (r == 0) {
      EXPECT_THROW(comm->gather(out, in, 0), CommError);  // the root checks its output, before communicating
    }
    comm->barrier()->wait();
  }
}

TEST(Collectives, MultiDimensionalAndEmptyTensors) {
  auto comm = test_world_comm();
  auto x = at::ones({3, 0, 2});
  EXPECT_NO_THROW(comm->all_reduce(x)->wait());
  auto y = at::ones({2, 3, 4}, at::kFloat);
  comm->all_reduce(y, {ReduceOp::kSum})->wait();
  EXPECT_EQ(y.sizes(), (at::IntArrayRef{2, 3, 4}));
  EXPECT_EQ(max_abs_diff(y, at::full({2, 3, 4}, comm->size(), at::kDouble)), 0);
}

TEST(Collectives, AsyncHandlesOverlap) {
  auto comm = test_world_comm();
  const int n = comm->size();
  std::vector<at::Tensor> bufs;
  std::vector<WorkPtr> works;
  for (int i = 0; i < 8; ++i) {
    bufs.push_back(at::full({1000 + i}, static_cast<double>(i), at::kFloat));
    works.push_back(comm->all_reduce(bufs.back(), {ReduceOp::kSum}));
  }
  // Wait in reverse order: completion of each is independent of the others being waited on.
  for (int i = 7; i >= 0; --i) works[i]->wait();
  for (int i = 0; i < 8; ++i) {
    EXPECT_TRUE(works[i]->is_completed());
    EXPECT_EQ(max_abs_diff(bufs[i], at::full({1000 + i}, 1.0 * i * n, at::kDouble)), 0);
  }
  comm->barrier()->wait();
}

TEST(Collectives, ArgumentErrorsAreReported) {
  auto comm = test_world_comm();
  auto expect_comm_error = [](auto&& f, const std::string& part) {
    try {
      f();
      ADD_FAILURE() << "expected CommError containing '" << part << "'";
    } catch (const CommError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  auto strided = at::ones({4, 4}).t();
  expect_comm_error([&] { comm->all_reduce(strided); }, "must be contiguous");
  auto ints = at::ones({4}, at::kInt);
  expect_comm_error([&] { comm->all_reduce(ints, {ReduceOp::kAvg}); }, "avg needs a floating dtype");
  auto in = at::ones({3});
  auto wrong_out = at::zeros({3 * comm->size() + 1});
  expect_comm_error([&] { comm->all_gather(wrong_out, in); }, "size mismatch");
  auto out_ok = at::zeros({3 * comm->size()}, at::kDouble);
  expect_comm_error([&] { comm->all_gather(out_ok, in); }, "dtype mismatch");
  auto small = at::zeros({2});  // 2 x n never equals the 3 input elements
  expect_comm_error([&] { comm->reduce_scatter(small, in, {ReduceOp::kSum, {}}); }, "size mismatch");
  expect_comm_error([&] { comm->broadcast(in, comm->size()); }, "outside the group");
  auto cplx = at::ones({2}, at::kComplexFloat);
  expect_comm_error([&] { comm->all_reduce(cplx); }, "unsupported dtype");
  // Every rank raised the same errors before communicating; the communicator is still usable.
  comm->barrier()->wait();
}

TEST(Collectives, GridSubGroups) {
  World& world = test_world();
  const int n = world.size();
  for (int tp : {1, 2, n}) {
    if (n % tp != 0) continue;
    GridOptions opts;
    opts.tensor_parallel_size = tp;
    ProcessGrid grid(world, opts);
    GridCoords c = grid_coords(world.rank(), n, tp);
    ASSERT_EQ(grid.tp().size(), tp);
    ASSERT_EQ(grid.dp().size(), n / tp);
    EXPECT_EQ(grid.tp_rank(), c.tp_rank);
    EXPECT_EQ(grid.dp_rank(), c.dp_rank);
    EXPECT_EQ(grid.tp().rank(), c.tp_rank);
    EXPECT_EQ(grid.dp().rank(), c.dp_rank);
    // Sum of world ranks within my TP group (adjacent ranks) and my DP group (strided).
    auto x = at::full({3}, world.rank(), at::kLong);
    grid.tp().all_reduce(x)->wait();
    int64_t tp_sum = 0;
    for (int q : tp_group_ranks(c.dp_rank, n, tp)) tp_sum += q;
    EXPECT_EQ(x[0].item<int64_t>(), tp_sum) << "tp " << tp;
    auto y = at::full({3}, world.rank(), at::kLong);
    grid.dp().all_reduce(y)->wait();
    int64_t dp_sum = 0;
    for (int q : dp_group_ranks(c.tp_rank, n, tp)) dp_sum += q;
    EXPECT_EQ(y[0].item<int64_t>(), dp_sum) << "dp " << tp;
    // Gather inside the TP group gives the group's world ranks in TP order.
    auto me = at::full({1}, world.rank(), at::kInt);
    auto all = at::zeros({tp}, at::kInt);
    grid.tp().all_gather(all, me)->wait();
    for (int q = 0; q < tp; ++q) EXPECT_EQ(all[q].item<int>(), tp_group_ranks(c.dp_rank, n, tp)[q]);
    // The world communicator of the grid spans everyone.
    auto w = at::ones({1}, at::kInt);
    grid.world().all_reduce(w)->wait();
    EXPECT_EQ(w.item<int>(), n);
  }
}

namespace {

// A communicator of its own over the world: the communication thread, or the nonblocking
// fallback that MPI without MPI_THREAD_MULTIPLE gets; shm_bytes > 0: with shared-memory slots of
// that size (MpiCommunicator).
std::shared_ptr<MpiCommunicator> own_comm(bool use_thread, const std::string& name,
                                          std::chrono::milliseconds timeout = std::chrono::milliseconds(20000),
                                          int64_t shm_bytes = 0) {
  return std::make_shared<MpiCommunicator>(MpiComm(MPI_COMM_WORLD, false), name, timeout, use_thread, shm_bytes);
}

// The ways a collective runs: the communication thread, the nonblocking fallback, and each of
// them with shared memory for what fits its slots (the grid's world and data-parallel groups:
// thread and shared memory; its tensor-parallel group: polled and shared memory).
enum class Path { kThread, kNonblocking, kThreadAndSharedMemory, kSharedMemory };
bool threaded(Path p) { return p == Path::kThread || p == Path::kThreadAndSharedMemory; }
bool shared(Path p) { return p == Path::kSharedMemory || p == Path::kThreadAndSharedMemory; }
std::string path_name(Path p) {
  switch (p) {
    case Path::kThread: return "CommunicationThread";
    case Path::kNonblocking: return "NonblockingFallback";
    case Path::kThreadAndSharedMemory: return "ThreadAndSharedMemory";
    case Path::kSharedMemory: return "SharedMemory";
  }
  return "";
}
const auto kEveryPath =
    testing::Values(Path::kThread, Path::kNonblocking, Path::kThreadAndSharedMemory, Path::kSharedMemory);
std::shared_ptr<MpiCommunicator> path_comm(Path p, const std::string& name,
                                           std::chrono::milliseconds timeout = std::chrono::milliseconds(20000)) {
  return own_comm(threaded(p), name, timeout, shared(p) ? kShmSlotBytes : 0);
}

// One collective in flight and the result it must leave.
struct InFlight {
  WorkPtr work;
  at::Tensor result, expected;
  std::string what;
};

}  // namespace

class CollectivesInFlight : public testing::TestWithParam<Path> {};

// Sixty collectives of every op, dtype and size issued back to back without waiting, then waited
// in an order of each rank's own (is_completed() polled in between). Runs of the same op and shape
// carry values that depend on their position in the sequence, so a rank that ran them out of
// issue order sums the wrong partners' values; a mismatched shape hangs into the timeout.
// The communicator is destroyed before the last third is waited: it must finish them first.
TEST_P(CollectivesInFlight, IssueOrderAndResultsHold) {
  auto comm = path_comm(GetParam(), "inflight[" + path_name(GetParam()) + "]");
  int provided = 0;
  MPI_Query_thread(&provided);
  EXPECT_EQ(comm->threaded(), threaded(GetParam()) && provided == MPI_THREAD_MULTIPLE);
  // One node: every collective below but broadcast and barrier goes through shared memory.
  EXPECT_EQ(comm->shm_slot_bytes() > 0, shared(GetParam()));
  const int n = comm->size(), r = comm->rank();
  const double tri = n * (n + 1) / 2.0;
  std::vector<InFlight> flights;
  for (int i = 0; i < 60; ++i) {
    // Tiny, odd, 32 KiB, 280 KB, and now and then 1.2 MB (the shared-memory direct reads).
    const int64_t sizes[] = {3, 1000 + i, 8190 + i % 5, i % 8 == 7 ? 300000 : 70000};
    const int64_t size = sizes[i % 4];
    const at::ScalarType t = (i % 5 == 4) ? at::kBFloat16 : (i % 7 == 6) ? at::kDouble : at::kFloat;
    InFlight f;
    switch (i % 6) {
      case 0: case 3: {  // sum: rank q adds (q + 1) * (i + 1) to a 0..4 pattern
        f.result = pattern(size, 0, 5, t).add_((r + 1) * (i % 8 + 1)).to(t);
        f.work = comm->all_reduce(f.result, {ReduceOp::kSum});
        f.expected = pattern(size, 0, 5, at::kDouble) * n + tri * (i % 8 + 1);
        f.what = "all_reduce sum";
        break;
      }
      case 1: {  // avg through the completion hook (bf16: fp32 staging, divide, copy back)
        f.result = at::full({size}, 2.0 * (r + 1) + i % 4, at::kDouble).to(t);
        f.work = comm->all_reduce(f.result, {ReduceOp::kAvg});
        f.expected = at::full({size}, n + 1.0 + i % 4, at::kDouble);
        f.what = "all_reduce avg";
        break;
      }
      case 2: {  // gather, equal shares then uneven ones
        const int64_t shard = size / n + 1;
        at::Tensor in = pattern(shard, 8.0 * r + i % 5, 4, t);
        if (i % 4 == 2) {
          f.result = at::zeros({shard * n}, t);
          f.work = comm->all_gather(f.result, in);
          std::vector<at::Tensor> parts;
          for (int q = 0; q < n; ++q) parts.push_back(pattern(shard, 8.0 * q + i % 5, 4, at::kDouble));
          f.expected = at::cat(parts);
        } else {
          std::vector<int64_t> counts;
          for (int q = 0; q < n; ++q) counts.push_back(shard + q);
          at::Tensor mine = pattern(counts[r], 8.0 * r + i % 5, 4, t);
          f.result = at::zeros({std::accumulate(counts.begin(), counts.end(), int64_t{0})}, t);
          f.work = comm->all_gather(f.result, mine, {counts});
          std::vector<at::Tensor> parts;
          for (int q = 0; q < n; ++q) parts.push_back(pattern(counts[q], 8.0 * q + i % 5, 4, at::kDouble));
          f.expected = at::cat(parts);
        }
        f.what = "all_gather";
        break;
      }
      case 4: {  // reduce_scatter, max over ranks of r * (i % 3 + 1)
        const int64_t shard = size / n + 1;
        at::Tensor in = at::full({shard * n}, 1.0 * r * (i % 3 + 1), at::kDouble).to(t);
        f.result = at::zeros({shard}, t);
        f.work = comm->reduce_scatter(f.result, in, {ReduceOp::kMax, {}});
        f.expected = at::full({shard}, 1.0 * (n - 1) * (i % 3 + 1), at::kDouble);
        f.what = "reduce_scatter max";
        break;
      }
      default: {  // broadcast from a root that moves with i
        const int root = i % n;
        f.result = r == root ? pattern(size, i, 7, t) : at::zeros({size}, t);
        f.work = comm->broadcast(f.result, root);
        f.expected = pattern(size, i, 7, at::kDouble);
        f.what = "broadcast from " + std::to_string(root);
        break;
      }
    }
    f.what += " #" + std::to_string(i) + " " + c10::toString(t) + " size " + std::to_string(size);
    flights.push_back(std::move(f));
    if (i % 10 == 9) flights.push_back({comm->barrier(), {}, {}, "barrier #" + std::to_string(i)});
  }
  std::vector<size_t> order(flights.size());
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(1234 + r));  // each rank its own order
  const size_t before_reset = order.size() * 2 / 3;
  for (size_t k = 0; k < order.size(); ++k) {
    if (k == before_reset) comm.reset();  // drains what is still queued, then joins its thread
    InFlight& f = flights[order[k]];
    for (auto& other : flights) other.work->is_completed();
    f.work->wait();
    f.work->wait();  // a second wait runs no hook again (an avg divided twice would show)
    EXPECT_TRUE(f.work->is_completed()) << f.what;
    if (f.result.defined()) {
      EXPECT_EQ(max_abs_diff(f.result, f.expected), 0) << f.what;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(EveryPath, CollectivesInFlight, kEveryPath,
                         [](const testing::TestParamInfo<Path>& p) { return path_name(p.param); });

// all_gather in place (the input is this rank's part of the output, as the distributed
// optimizer's parameter gather): MPI_IN_PLACE on MPI's path (aliased buffers are an error there),
// nothing copied onto itself on the shared-memory paths; small and large.
class CollectivesInPlace : public testing::TestWithParam<Path> {};

TEST_P(CollectivesInPlace, AllGatherOfOwnPart) {
  auto comm = path_comm(GetParam(), "in_place");
  const int n = comm->size(), r = comm->rank();
  for (int64_t share : {int64_t{3}, int64_t{3000}, int64_t{300000}}) {
    at::Tensor out = at::full({share * n}, -1.0f);
    out.narrow(0, r * share, share).copy_(pattern(share, 4.0 * r, 4, at::kFloat));
    comm->all_gather(out, out.narrow(0, r * share, share))->wait();
    std::vector<at::Tensor> parts;
    for (int q = 0; q < n; ++q) parts.push_back(pattern(share, 4.0 * q, 4, at::kDouble));
    EXPECT_EQ(max_abs_diff(out, at::cat(parts)), 0) << "share " << share;
  }
}
INSTANTIATE_TEST_SUITE_P(EveryPath, CollectivesInPlace, kEveryPath,
                         [](const testing::TestParamInfo<Path>& p) { return path_name(p.param); });

class CollectivesTimeout : public testing::TestWithParam<std::tuple<Path, int64_t>> {};

// Rank 0 waits for an all_reduce the others issue only later: its wait() throws the TimeoutError
// of the contract; once they come the collective completes and the communicator ends cleanly.
TEST_P(CollectivesTimeout, LateRanksTimeOutTheWaitThenComplete) {
  const auto [path, size] = GetParam();
  auto comm = path_comm(path, "late", std::chrono::milliseconds(60000));
  const int n = comm->size(), r = comm->rank();
  auto x = at::full({size}, r + 1.0, at::kFloat);
  if (r == 0) {
    WorkPtr work = comm->all_reduce(x, {ReduceOp::kSum});
    try {
      work->wait(std::chrono::milliseconds(300));
      ADD_FAILURE() << "expected a TimeoutError";
    } catch (const TimeoutError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("collective all_reduce on late (group rank 0 of " + std::to_string(n) +
                         ", world rank 0, mpi) did not complete within 0.3"), std::string::npos) << msg;
      EXPECT_NE(msg.find("(parallel.collective_timeout_s): another rank skipped it, died or is stuck"),
                std::string::npos) << msg;
    }
    EXPECT_FALSE(work->is_completed());
    MPI_Barrier(MPI_COMM_WORLD);
    work->wait();
  } else {
    MPI_Barrier(MPI_COMM_WORLD);
    comm->all_reduce(x, {ReduceOp::kSum})->wait();
  }
  EXPECT_EQ(max_abs_diff(x, at::full({size}, n * (n + 1) / 2.0, at::kDouble)), 0);
  comm->barrier()->wait();
}

// A small and a large buffer (Open MPI picks different algorithms), and one that the
// shared-memory path without a thread reads directly from the other ranks.
INSTANTIATE_TEST_SUITE_P(EveryPath, CollectivesTimeout,
                         testing::Combine(kEveryPath, testing::Values(int64_t{5000}, int64_t{100000}, int64_t{300000})),
                         [](const testing::TestParamInfo<std::tuple<Path, int64_t>>& p) {
                           return path_name(std::get<0>(p.param)) + "_" +
                                  std::to_string(std::get<1>(p.param) * 4 / 1000) + "KB";
                         });

// The shared-memory collectives (every group of the grid, on one node), polled: random fp32
// values, so the order of a sum shows; every rank must hold the same bits, those of the sum in
// rank order, for all_reduce around the slot size (one piece, two, four; or read directly from
// the other ranks' buffers above a slot), every op, bf16 through the fp32 staging, more
// operations issued ahead of their waits than there are slots, a work dropped unwaited;
// all_gather of every kind of dtype and reduce_scatter (both sides of a slot); a segment too
// large for /dev/shm refused; the grid's groups have them. Polled with and without direct
// reads, and threaded with them (its thread runs the direct reads above 4 MB).
enum class ShmPath { kSlotsOnly, kDirect, kDirectOnThread };
class SharedMemory : public testing::TestWithParam<ShmPath> {};

TEST_P(SharedMemory, CollectivesGiveEveryRankTheSameBits) {
  const bool direct = GetParam() != ShmPath::kSlotsOnly;
  const bool threaded = GetParam() == ShmPath::kDirectOnThread;
  if (!direct) setenv("ANDYLLM_MPI_SHM_DIRECT", "0", 1);
  auto comm = own_comm(threaded, "shm", std::chrono::milliseconds(20000), kShmSlotBytes);
  unsetenv("ANDYLLM_MPI_SHM_DIRECT");
  const int n = comm->size(), r = comm->rank();
  ASSERT_EQ(comm->shm_slot_bytes(), kShmSlotBytes);  // one node
  ASSERT_EQ(comm->shm_direct(), direct);  // one user, no ptrace restriction here
  int provided = 0;
  MPI_Query_thread(&provided);
  if (threaded && provided != MPI_THREAD_MULTIPLE) GTEST_SKIP() << "no MPI_THREAD_MULTIPLE: no thread";
  const int64_t cap = kShmSlotBytes / 4;           // fp32 elements in a slot
  auto input = [](int q, int64_t size, int i) {
    at::Generator g = at::detail::createCPUGenerator(1000 * i + q);
    return at::randn({size}, g, at::kFloat);
  };
  // What every rank must hold: the inputs of draw i reduced in rank order, ((x0 + x1) + x2) + x3.
  auto rank_order = [&](int64_t size, int i, ReduceOp op) {
    at::Tensor expect = input(0, size, i);
    for (int q = 1; q < n; ++q) {
      at::Tensor y = input(q, size, i);
      expect = op == ReduceOp::kMax ? at::maximum(expect, y) : op == ReduceOp::kMin ? at::minimum(expect, y) : expect + y;
    }
    return op == ReduceOp::kAvg ? expect / static_cast<float>(n) : expect;
  };
  // Threaded: above a slot and up to 4 MB Open MPI's blocking call runs them, beyond that the
  // thread's direct reads.
  std::vector<int64_t> sizes = {1, 5, 4096, cap, cap + 1, 3 * cap + 7};
  if (threaded) sizes.push_back((int64_t{4} << 20) / 4 + 11);
  const ReduceOp ops[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};
  std::vector<std::tuple<WorkPtr, at::Tensor, at::Tensor, std::string>> flights;
  int i = 0;
  for (int64_t size : sizes) {
    for (ReduceOp op : ops) {
      at::Tensor x = input(r, size, i);
      flights.emplace_back(comm->all_reduce(x, {op}), x, rank_order(size, i, op),
                           "size " + std::to_string(size) + " op " + std::to_string(int(op)));
      ++i;
    }
  }
  for (auto& [work, x, expect, what] : flights) {
    work->wait();
    // Open MPI's blocking call (threaded, above a slot and up to 4 MB) sums in an order of its
    // own: close to the rank order, and the same bits on every rank (below).
    if (threaded && x.numel() > cap && x.numel() * 4 <= (int64_t{4} << 20))
      EXPECT_TRUE(at::allclose(x, expect, 1e-5, 1e-5)) << what << ": " << max_abs_diff(x, expect);
    else
      EXPECT_TRUE(at::equal(x, expect)) << what << ": " << max_abs_diff(x, expect);
    // The same bits on every rank.
    at::Tensor mine = x.clone(), lo = x.clone();
    MPI_Allreduce(MPI_IN_PLACE, mine.data_ptr<float>(), static_cast<int>(mine.numel()), MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, lo.data_ptr<float>(), static_cast<int>(lo.numel()), MPI_FLOAT, MPI_MIN, MPI_COMM_WORLD);
    EXPECT_TRUE(at::equal(mine, lo)) << what;
  }
  // A work dropped unwaited: its operation keeps its buffer and completes with the later ones.
  {
    at::Tensor dropped = at::full({3000}, 1.0, at::kFloat);
    comm->all_reduce(dropped, {ReduceOp::kSum});
  }
  for (int k = 0; k < 2 * ShmCollectives::kSlots; ++k) {
    at::Tensor z = at::full({3000}, 1.0 * k, at::kFloat);
    comm->all_reduce(z, {ReduceOp::kSum})->wait();
    EXPECT_EQ(max_abs_diff(z, at::full({3000}, 1.0 * k * n, at::kDouble)), 0) << k;
  }
  // bf16: staged in fp32, rounded once.
  at::Tensor b = at::full({1000}, 1.5 * (r + 1), at::kBFloat16);
  comm->all_reduce(b, {ReduceOp::kSum})->wait();
  EXPECT_EQ(max_abs_diff(b, at::full({1000}, 1.5 * n * (n + 1) / 2, at::kDouble)), 0);
  // all_gather through the slots (any dtype, bytes as they are, up to 128 KB gathered; larger
  // through MPI) and reduce_scatter (random fp32: the sum in rank order, the same bits).
  for (auto t : {at::kFloat, at::kBFloat16, at::kLong, at::kByte}) {
    for (int64_t last : {int64_t{0}, int64_t{3000}, cap}) {
      const bool uneven = last > 0;
      std::vector<int64_t> counts;
      for (int q = 0; q < n; ++q) counts.push_back(uneven ? (q == n - 1 ? last : 37 * q) : 1000);
      const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
      at::Tensor out = at::zeros({total}, t);
      comm->all_gather(out, pattern(counts[r], 3.0 * r, 7, t), {uneven ? counts : std::vector<int64_t>{}})->wait();
      std::vector<at::Tensor> parts;
      for (int q = 0; q < n; ++q) parts.push_back(pattern(counts[q], 3.0 * q, 7, at::kDouble));
      EXPECT_EQ(max_abs_diff(out, at::cat(parts)), 0) << "all_gather " << t << (uneven ? " uneven" : "");
    }
  }
  for (ReduceOp op : ops) {
    // Within a slot; beyond one, read directly (MPI's own order of a sum is not the slots').
    for (int64_t per_rank : direct ? std::vector<int64_t>{cap / n, 3 * cap / n + 5} : std::vector<int64_t>{cap / n}) {
      std::vector<int64_t> counts;
      for (int q = 0; q < n; ++q) counts.push_back(per_rank - 3 * q);
      const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
      const int64_t off = std::accumulate(counts.begin(), counts.begin() + r, int64_t{0});
      const at::Tensor expect = rank_order(total, 500 + int(op), op);
      at::Tensor out = at::zeros({counts[r]}, at::kFloat);
      comm->reduce_scatter(out, input(r, total, 500 + int(op)), {op, counts})->wait();
      EXPECT_TRUE(at::equal(out, expect.narrow(0, off, counts[r]))) << "reduce_scatter op " << int(op) << " " << total;
    }
  }
  at::Tensor rs = at::zeros({700}, at::kBFloat16);
  comm->reduce_scatter(rs, at::full({700 * n}, 0.5 * (r + 1), at::kBFloat16), {ReduceOp::kSum, {}})->wait();
  EXPECT_EQ(max_abs_diff(rs, at::full({700}, 0.5 * n * (n + 1) / 2, at::kDouble)), 0);
  // A segment larger than /dev/shm has room for: refused at creation, every all-reduce on MPI.
  auto big = own_comm(false, "shm_too_big", std::chrono::milliseconds(20000), int64_t{1} << 42);
  EXPECT_EQ(big->shm_slot_bytes(), 0);
  at::Tensor y = at::full({5000}, 1.0 * (r + 1), at::kFloat);
  big->all_reduce(y, {ReduceOp::kSum})->wait();
  EXPECT_EQ(max_abs_diff(y, at::full({5000}, n * (n + 1) / 2.0, at::kDouble)), 0);
  // The grid's groups have it.
  GridOptions opts;
  opts.tensor_parallel_size = n;
  ProcessGrid grid(test_world(), opts);
  for (Communicator* c : {&grid.tp(), &grid.world(), &grid.dp()})  // dp: one rank, nothing to share
    EXPECT_EQ(dynamic_cast<MpiCommunicator&>(*c).shm_slot_bytes(), c->size() > 1 ? kShmSlotBytes : 0) << c->name();
}

// A direct operation reads the other ranks' buffers where their callers keep them: it may
// complete on a rank only once every rank has read that rank's buffer. Rank 0 overwrites its
// buffers as soon as its wait returns, while the others come to theirs 100 ms later.
TEST(Collectives, DirectReadsCompleteOnlyOnceEveryRankHasRead) {
  auto comm = own_comm(false, "direct", std::chrono::milliseconds(20000), kShmSlotBytes);
  if (!comm->shm_direct()) GTEST_SKIP() << "direct reads are not allowed here";
  const int n = comm->size(), r = comm->rank();
  const int64_t size = 400000;  // 1.6 MB: all_reduce and all_gather both read directly
  at::Tensor reduced = at::full({size}, r + 1.0, at::kFloat);
  at::Tensor mine = at::full({size}, 10.0 * (r + 1), at::kFloat);
  at::Tensor gathered = at::zeros({size * n}, at::kFloat);
  WorkPtr a = comm->all_reduce(reduced, {ReduceOp::kSum});
  WorkPtr g = comm->all_gather(gathered, mine);
  if (r != 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  a->wait();
  g->wait();
  if (r == 0) {
    reduced.fill_(-1);
    mine.fill_(-1);
  }
  if (r != 0) {
    EXPECT_EQ(max_abs_diff(reduced, at::full({size}, n * (n + 1) / 2.0, at::kDouble)), 0);
  }
  std::vector<at::Tensor> parts;
  for (int q = 0; q < n; ++q) parts.push_back(at::full({size}, 10.0 * (q + 1), at::kDouble));
  EXPECT_EQ(max_abs_diff(gathered, at::cat(parts)), 0);
  comm->barrier()->wait();
}

INSTANTIATE_TEST_SUITE_P(DirectReads, SharedMemory,
                         testing::Values(ShmPath::kSlotsOnly, ShmPath::kDirect, ShmPath::kDirectOnThread),
                         [](const testing::TestParamInfo<ShmPath>& p) {
                           return p.param == ShmPath::kSlotsOnly ? "SlotsOnly"
                                  : p.param == ShmPath::kDirect  ? "Direct"
                                                                 : "DirectOnThread";
                         });
