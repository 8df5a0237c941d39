// MPI error text and the owning MPI_Comm wrapper.
#include "parallel/mpi_utils.h"

#include <immintrin.h>
#include <sched.h>

#include <chrono>
#include <thread>

#include "parallel/agreement.h"

namespace andy {

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(buf, len) + " (code " + std::to_string(code) + ")";
}

void run_agreed(MPI_Comm comm, const std::function<void()>& fn) {
  if (comm == MPI_COMM_NULL) {
    fn();
    return;
  }
  FailureKind kind = FailureKind::kNone;
  std::string msg;
  try {
    fn();
  } catch (const std::exception& e) {
    kind = failure_kind_of(e);
    msg = e.what();
  }
  AgreementTransport t;
  MPI_CHECK(MPI_Comm_rank(comm, &t.rank));
  MPI_CHECK(MPI_Comm_size(comm, &t.size));
  t.min_over_ranks = [comm](int v) {
    int out = v;
    MPI_CHECK(MPI_Allreduce(&v, &out, 1, MPI_INT, MPI_MIN, comm));
    return out;
  };
  t.broadcast_ints = [comm](std::vector<int32_t>& values, int root) {
    int n = static_cast<int>(values.size());
    MPI_CHECK(MPI_Bcast(&n, 1, MPI_INT, root, comm));
    values.resize(static_cast<size_t>(n));
    if (n > 0) MPI_CHECK(MPI_Bcast(values.data(), n, MPI_INT32_T, root, comm));
  };
  agree_or_throw_first_failure(t, kind, msg);
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owned_ && comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

MpiComm& MpiComm::operator=(MpiComm&& o) noexcept {
  if (this != &o) {
    MpiComm tmp(std::move(*this));
    comm_ = o.comm_;
    owned_ = o.owned_;
    o.comm_ = MPI_COMM_NULL;
    o.owned_ = false;
  }
  return *this;
}

int MpiComm::rank() const {
  int r = 0;
  MPI_CHECK(MPI_Comm_rank(comm_, &r));
  return r;
}

int MpiComm::size() const {
  int s = 0;
  MPI_CHECK(MPI_Comm_size(comm_, &s));
  return s;
}

MpiComm MpiComm::split(int color, int key) const {
  MPI_Comm out;
  MPI_CHECK(MPI_Comm_split(comm_, color, key, &out));
  return MpiComm(out, true);
}

MpiComm MpiComm::dup() const {
  MPI_Comm out;
  MPI_CHECK(MPI_Comm_dup(comm_, &out));
  return MpiComm(out, true);
}

void poll_backoff(int poll, int spins, int yields, int short_sleeps) {
  if (poll < spins) {
    _mm_pause();
  } else if (poll < yields) {
    sched_yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(poll < short_sleeps ? 50 : 500));
  }
}

}  // namespace andy
