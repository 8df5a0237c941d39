// Durable publishing helpers (see durable_fs.h). POSIX only.
#include "core/base/durable_fs.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/base/error.h"

namespace andy {

namespace fs = std::filesystem;

std::string free_space_text(const std::string& path) {
  struct statvfs st {};
  fs::path p(path);
  while (!p.empty() && !fs::exists(p)) p = p.parent_path();
  if (p.empty()) p = ".";
  if (statvfs(p.c_str(), &st) != 0) return "";
  double bytes = static_cast<double>(st.f_bavail) * static_cast<double>(st.f_frsize);
  char buf[128];
  std::snprintf(buf, sizeof buf, "%.1f MiB free on %s", bytes / (1024.0 * 1024.0), p.c_str());
  return buf;
}

std::string io_failure_text(const std::string& path, int err) {
  std::string text = std::strerror(err);
  if (err == ENOSPC || err == EDQUOT) {
    std::string free = free_space_text(path);
    if (!free.empty()) text += " (" + free + ")";
  }
  return text;
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) ANDY_THROW(IoError, "cannot open ", path, " to sync it: ", std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems refuse fsync on directories (EINVAL): nothing more can be done there.
  if (rc != 0 && err != EINVAL && err != EROFS)
    ANDY_THROW(IoError, "cannot sync ", path, ": ", io_failure_text(path, err));
}

void write_file_durable(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  DurableWriter out(tmp);
  out.write(text);
  out.finish();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    ANDY_THROW(IoError, "cannot rename ", tmp, " to ", path, ": ", std::strerror(err));
  }
  std::string dir = fs::path(path).parent_path().string();
  fsync_path(dir.empty() ? "." : dir);
}

std::string exchange_paths(const std::string& a, const std::string& b) {
#ifdef RENAME_EXCHANGE
  if (::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) == 0) return "";
  if (errno != EINVAL && errno != ENOSYS)
    ANDY_THROW(IoError, "cannot exchange ", a, " and ", b, ": ", std::strerror(errno));
#endif
  const std::string aside = a + ".swap";
  std::error_code ec;
  fs::remove_all(aside, ec);
  fs::rename(a, aside);
  fs::rename(b, a);
  fs::rename(aside, b);
  return "the file system has no atomic exchange: swapped by three renames";
}

std::string partial_path_for(const std::string& dest) {
  std::string d = dest;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d + ".partial-" + std::to_string(::getpid());
}

void publish_path(const std::string& tmp, const std::string& dest, bool replace) {
  std::string d = dest;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(d, ec));
  ANDY_CHECK_T(IoError, !exists || replace, d, " already exists (pass --overwrite to replace it)");
  const std::string aside = d + ".replaced-" + std::to_string(::getpid());
  if (exists && ::rename(d.c_str(), aside.c_str()) != 0)
    ANDY_THROW(IoError, "cannot move ", d, " aside to replace it: ", std::strerror(errno));
  if (::rename(tmp.c_str(), d.c_str()) != 0) {
    const int err = errno;
    if (exists) ::rename(aside.c_str(), d.c_str());
    ANDY_THROW(IoError, "cannot rename ", tmp, " to ", d, ": ", std::strerror(err));
  }
  std::string parent = fs::path(d).parent_path().string();
  fsync_path(parent.empty() ? "." : parent);
  if (exists) fs::remove_all(aside, ec);
}

void build_then_publish(const std::string& dest, bool replace, const std::function<void(const std::string& tmp)>& build) {
  const std::string tmp = partial_path_for(dest);
  try {
    build(tmp);
    publish_path(tmp, dest, replace);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

void check_output_free(const std::string& dest, bool replace) {
  std::error_code ec;
  const fs::path parent = fs::path(dest).parent_path();
  ANDY_USER_CHECK(parent.empty() || fs::is_directory(parent, ec), "output ", dest, ": the directory ",
                  parent.string(), " does not exist");
  ANDY_USER_CHECK(replace || !fs::exists(fs::symlink_status(dest, ec)), "output ", dest,
                  " already exists (pass --overwrite to replace it)");
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path);
  ANDY_CHECK_T(IoError, f.good(), "cannot read ", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

DurableWriter::DurableWriter(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) ANDY_THROW(IoError, "cannot write ", path, ": ", io_failure_text(path, errno));
}

DurableWriter::DurableWriter(DurableWriter&& o) noexcept
    : path_(std::move(o.path_)), fd_(o.fd_), error_(o.error_), written_(o.written_) {
  o.fd_ = -1;
}

DurableWriter::~DurableWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(path_.c_str());
  }
}

void DurableWriter::write(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (error_ == 0 && n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      error_ = w < 0 ? errno : ENOSPC;
      break;
    }
    p += w;
    n -= static_cast<size_t>(w);
    written_ += static_cast<uint64_t>(w);
  }
}

void DurableWriter::pad_to(uint64_t alignment) {
  static const char zeros[64] = {};
  while (alignment > 1 && written_ % alignment != 0 && error_ == 0)
    write(zeros, std::min<uint64_t>(sizeof zeros, alignment - written_ % alignment));
}

void DurableWriter::finish() {
  ANDY_CHECK(fd_ >= 0, "DurableWriter::finish called twice for ", path_);
  if (error_ == 0 && ::fsync(fd_) != 0) error_ = errno;
  if (::close(fd_) != 0 && error_ == 0) error_ = errno;
  fd_ = -1;
  if (error_ != 0) {
    ::unlink(path_.c_str());
    ANDY_THROW(IoError, "cannot write ", path_, ": ", io_failure_text(path_, error_));
  }
}

}  // namespace andy
