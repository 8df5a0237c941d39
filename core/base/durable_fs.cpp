// Durable publishing helpers (see durable_fs.h). POSIX only.
#include "core/base/durable_fs.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

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
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) ANDY_THROW(IoError, "cannot write ", tmp, ": ", io_failure_text(tmp, errno));
  size_t done = 0;
  int err = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    ANDY_THROW(IoError, "cannot write ", tmp, ": ", io_failure_text(tmp, err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
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

}  // namespace andy
