// A background job for end-to-end tests (an mpirun job, a launcher script): started through
// /bin/sh in its own process group, output to a log file, waited for with a deadline and killed
// (the whole group) if a test ends early.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/launch/run_command.h"

namespace andy::testing_util {

// A job started in the background through /bin/sh, in its own process group (as a shell puts a
// foreground job), with its output in `log`.
struct Job {
  pid_t pid = -1;
  std::string log;
  int status = 0;

  Job(const std::string& cmd, std::string log_path) : log(std::move(log_path)) {
    std::string full = "exec " + cmd + " > " + log + " 2>&1";
    pid = fork();
    if (pid == 0) {
      setpgid(0, 0);
      execl("/bin/sh", "sh", "-c", full.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    if (pid > 0) setpgid(pid, pid);
  }
  ~Job() {
    if (pid > 0) {  // a test that failed early: leave nothing running
      kill(-pid, SIGKILL);
      waitpid(pid, &status, 0);
    }
  }
  // Whether the job has exited (reaped now if so); never waits.
  bool exited() {
    if (pid <= 0) return true;
    if (waitpid(pid, &status, WNOHANG) != pid) return false;
    pid = -1;
    return true;
  }
  // Waits until the job has exited; false after `seconds` (the destructor kills it then).
  bool wait_exit(int seconds) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  int exit_code() const { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }
  std::string output() const {
    std::ifstream f(log);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  }
};

// Waits until process `pid` (not necessarily our child) has exited: no /proc entry, or a zombie
// left to a parent that does not reap. False after `seconds`.
inline bool wait_gone(pid_t pid, int seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (true) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t paren = stat.rfind(')');
    if (!f.is_open() || stat.empty() || (paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z'))
      return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Direct children of `pid` (the ranks, when `pid` is mpirun).
inline std::vector<pid_t> children_of(pid_t pid) {
  auto r = run_command("pgrep -P " + std::to_string(pid));
  std::vector<pid_t> out;
  std::istringstream is(r.output);
  for (pid_t c; is >> c;) out.push_back(c);
  return out;
}

}  // namespace andy::testing_util
