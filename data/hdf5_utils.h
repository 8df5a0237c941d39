// HDF5 plumbing: H5_CHECK (names file:line, rank, what we were doing and HDF5's own error
// stack), an owning hid_t wrapper, and the process-wide lock every HDF5 call takes: Debian's
// serial libhdf5 is not thread-safe, and the loader reads on a background thread.
#pragma once

#include <hdf5.h>

#include <mutex>
#include <string>

#include "core/base/error.h"

namespace andy::data {

// Held around every HDF5 call in the data layer.
std::recursive_mutex& hdf5_mutex();
// HDF5's current error stack as one line (and clears it); also turns HDF5's own printing off.
std::string hdf5_error_text();
// Disables HDF5's automatic error printing (our messages carry the stack instead) and its
// library shutdown at exit (which crashed after a failed close). Call before any other HDF5 call,
// on every thread that makes them (the printing is set per thread).
void hdf5_quiet();

// Owning hid_t: closes with the matching H5?close. Copy deleted, move allowed.
class H5Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Handle() = default;
  H5Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~H5Handle() { reset(); }
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  H5Handle(H5Handle&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = -1; }
  H5Handle& operator=(H5Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = -1;
    }
    return *this;
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset() {
    if (id_ >= 0 && closer_) closer_(id_);
    id_ = -1;
  }

 private:
  hid_t id_ = -1;
  Closer closer_ = nullptr;
};

}  // namespace andy::data

// Throws ErrType("file:line [rank R] <context>: HDF5: <stack>") when `call` returns < 0.
#define H5_CHECK_T(ErrType, call, ...)                                                        \
  ([&]() {                                                                                    \
    auto andy_h5_rc_ = (call);                                                                \
    if (andy_h5_rc_ < 0) {                                                                    \
      throw ErrType(::andy::where(__FILE__, __LINE__) + ::andy::detail::concat(__VA_ARGS__) + \
                    ": HDF5: " + ::andy::data::hdf5_error_text());                            \
    }                                                                                         \
    return andy_h5_rc_;                                                                       \
  }())
#define H5_CHECK(call, ...) H5_CHECK_T(::andy::IoError, call, __VA_ARGS__)
