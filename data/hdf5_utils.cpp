// HDF5 lock, quiet mode and error-stack text.
#include "data/hdf5_utils.h"

namespace andy::data {

std::recursive_mutex& hdf5_mutex() {
  static std::recursive_mutex m;
  return m;
}

void hdf5_quiet() {
  static std::once_flag once;
  std::call_once(once, [] {
    // No library shutdown at exit: after a failed close (a full disk) HDF5's atexit handler
    // closes the half-written file again and crashed the process (exit 139) after the error was
    // reported. Every file is closed explicitly by its owner (H5Handle), so nothing is lost.
    H5dont_atexit();
  });
  // Debian's libhdf5 is a thread-safe build, where the automatic printing of errors is set per
  // thread: each thread that calls HDF5 (preprocess's shard writers, the loader's read-ahead)
  // turns it off for itself.
  thread_local bool quiet = false;
  if (!quiet) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    quiet = true;
  }
}

namespace {
herr_t walk(unsigned n, const H5E_error2_t* e, void* data) {
  auto* out = static_cast<std::string*>(data);
  if (e->desc && *e->desc) {
    if (!out->empty()) *out += "; ";
    *out += e->desc;
  }
  return 0;
}
}  // namespace

std::string hdf5_error_text() {
  std::string out;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk, &out);
  H5Eclear2(H5E_DEFAULT);
  return out.empty() ? "(no HDF5 error detail)" : out;
}

}  // namespace andy::data
