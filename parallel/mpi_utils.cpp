// MPI error text and the owning MPI_Comm wrapper.
#include "parallel/mpi_utils.h"

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
  int rank = 0, size = 1;
  MPI_CHECK(MPI_Comm_rank(comm, &rank));
  MPI_CHECK(MPI_Comm_size(comm, &size));
  std::string msg;
  int kind = 0;  // 0 none, 1 ConfigError, 2 IoError, 3 CommError, 4 other
  try {
    fn();
  } catch (const ConfigError& e) {
    msg = e.what();
    kind = 1;
  } catch (const IoError& e) {
    msg = e.what();
    kind = 2;
  } catch (const CommError& e) {
    msg = e.what();
    kind = 3;
  } catch (const std::exception& e) {
    msg = e.what();
    kind = 4;
  }
  int failed = kind ? rank : size, first = size;
  MPI_CHECK(MPI_Allreduce(&failed, &first, 1, MPI_INT, MPI_MIN, comm));
  if (first == size) return;
  int len = static_cast<int>(msg.size());
  MPI_CHECK(MPI_Bcast(&kind, 1, MPI_INT, first, comm));
  MPI_CHECK(MPI_Bcast(&len, 1, MPI_INT, first, comm));
  msg.resize(static_cast<size_t>(len));
  if (len > 0) MPI_CHECK(MPI_Bcast(msg.data(), len, MPI_CHAR, first, comm));
  const bool report = rank == first;
  switch (kind) {
    case 1: throw Agreed<ConfigError>(msg, report);
    case 2: throw Agreed<IoError>(msg, report);
    case 3: throw Agreed<CommError>(msg, report);
    default: throw Agreed<Error>(msg, report);
  }
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

}  // namespace andy
