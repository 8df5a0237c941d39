// main() for multi-rank GoogleTest binaries (run under mpirun by ctest).
// Every rank runs every test; only rank 0 prints the usual gtest output, other ranks print
// their failures prefixed with their rank. The exit code is non-zero on every rank if any rank
// failed, so mpirun and ctest report it.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "tests/mpi_test_main.h"

#include "parallel/process_grid.h"

namespace {
andy::World* g_world = nullptr;

class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (r.failed()) {
      std::fprintf(stderr, "[rank %d] FAILURE %s:%d\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
    }
  }

 private:
  int rank_;
};

}  // namespace

andy::World& andy::test_world() { return *g_world; }

andy::CommPtr andy::test_world_comm() {
  static CommPtr comm = make_communicator(Backend::kMpi, MpiComm(MPI_COMM_WORLD, false), "world", -1,
                                          std::chrono::milliseconds(60000));
  return comm;
}

int main(int argc, char** argv) {
  andy::World world(&argc, &argv);
  g_world = &world;
  testing::InitGoogleTest(&argc, argv);
  if (world.rank() != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(world.rank()));
  }
  int local = RUN_ALL_TESTS();
  int global = 0;
  MPI_Allreduce(&local, &global, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (world.rank() == 0 && global != local) {
    std::fprintf(stderr, "[rank 0] another rank reported a test failure (see its output)\n");
  }
  return global;
}
