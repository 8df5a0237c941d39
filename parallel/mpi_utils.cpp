// MPI error text and the owning MPI_Comm wrapper.
#include "parallel/mpi_utils.h"

namespace andy {

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(buf, len) + " (code " + std::to_string(code) + ")";
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
