// Spawning ranks: fork + execve (the environment built before fork, so the child only calls
// async-signal-safe functions), each child in its own process group (signals reach it once, from
// here) and killed if the launcher dies; a 10 ms loop reaps children and passes signals on.
#include "dist/launch.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"
#include "dist/socket.h"

extern char** environ;

namespace kiln::dist {
namespace {

using Clock = std::chrono::steady_clock;

volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_signal(int sig) { g_signal = sig; }

// Installs the forwarding handlers for the scope.
class SignalScope {
 public:
  SignalScope() {
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
    g_signal = 0;
  }
  ~SignalScope() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

std::string find_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* path = std::getenv("PATH");
  std::string dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    start = end + 1;
  }
  KILN_FAIL("launch", "program '{}' not found in PATH", name);
}

std::string describe(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return fmt::format("ended with wait status {}", status);
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

int free_port() {
  net::Socket s = net::listen_tcp(0);
  return net::local_port(s);
}

struct Child {
  pid_t pid = -1;
  int rank = 0;
  bool running = false;
};

}  // namespace

int launch(const LaunchOptions& o, const std::vector<std::string>& argv) {
  KILN_CHECK(!argv.empty(), "launch", "expected a program to run after the options");
  KILN_CHECK(o.nproc >= 1, "launch", "expected --nproc >= 1, found {}", o.nproc);
  KILN_CHECK(o.nnodes >= 1, "launch", "expected --nnodes >= 1, found {}", o.nnodes);
  KILN_CHECK(o.node_rank >= 0 && o.node_rank < o.nnodes, "launch", "expected --node-rank in [0, {}), found {}",
             o.nnodes, o.node_rank);
  KILN_CHECK(o.master_port >= 0 && o.master_port <= 65535, "launch", "expected a port in [0, 65535], found {}",
             o.master_port);
  const int port = o.master_port != 0 ? o.master_port : o.nnodes == 1 ? free_port() : 29500;
  const std::string program = find_program(argv[0]);
  const int world = o.nproc * o.nnodes;

  // Everything the children need, built before any fork.
  std::vector<std::vector<std::string>> envs(static_cast<size_t>(o.nproc));
  static const char* kOurs[] = {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=",
                                "MASTER_PORT=", "GROUP_RANK=", "NODE_RANK="};
  for (int local = 0; local < o.nproc; ++local) {
    auto& env = envs[static_cast<size_t>(local)];
    for (char** e = environ; *e != nullptr; ++e) {
      bool ours = false;
      for (const char* k : kOurs) ours = ours || std::strncmp(*e, k, std::strlen(k)) == 0;
      if (!ours) env.emplace_back(*e);
    }
    env.push_back(fmt::format("RANK={}", o.node_rank * o.nproc + local));
    env.push_back(fmt::format("WORLD_SIZE={}", world));
    env.push_back(fmt::format("LOCAL_RANK={}", local));
    env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", o.nproc));
    env.push_back(fmt::format("GROUP_RANK={}", o.node_rank));
    env.push_back(fmt::format("NODE_RANK={}", o.node_rank));
    env.push_back(fmt::format("MASTER_ADDR={}", o.master_addr));
    env.push_back(fmt::format("MASTER_PORT={}", port));
  }
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);

  SignalScope signals;
  const pid_t launcher = ::getpid();
  std::vector<Child> children;
  std::string spawn_error;
  for (int local = 0; local < o.nproc && spawn_error.empty(); ++local) {
    std::vector<char*> envp;
    for (const std::string& e : envs[static_cast<size_t>(local)]) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    int pipefd[2];
    KILN_CHECK(::pipe2(pipefd, O_CLOEXEC) == 0, "launch", "pipe failed: {}", std::strerror(errno));
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != launcher) ::_exit(127);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      ::execve(program.c_str(), args.data(), envp.data());
      int e = errno;
      [[maybe_unused]] auto n = ::write(pipefd[1], &e, sizeof(e));  // exec failed: tell the launcher why
      ::_exit(127);
    }
    ::close(pipefd[1]);
    if (pid < 0) {
      spawn_error = fmt::format("fork failed: {}", std::strerror(errno));
      ::close(pipefd[0]);
      break;
    }
    ::setpgid(pid, pid);  // also from here, so signals below reach the group even before the child ran
    children.push_back({pid, o.node_rank * o.nproc + local, true});
    int child_errno = 0;
    ssize_t n = ::read(pipefd[0], &child_errno, sizeof(child_errno));  // 0 bytes: exec succeeded
    ::close(pipefd[0]);
    if (n == static_cast<ssize_t>(sizeof(child_errno)))
      spawn_error = fmt::format("could not run '{}': {}", program, std::strerror(child_errno));
  }

  int result = 0;
  bool stopping = !spawn_error.empty();
  Clock::time_point kill_at = Clock::now() + o.grace;
  bool killed = false;
  auto signal_all = [&](int sig) {
    for (const Child& c : children)
      if (c.running) ::kill(-c.pid, sig);
  };
  if (stopping) signal_all(SIGTERM);
  for (;;) {
    bool any_running = false;
    for (Child& c : children) {
      if (!c.running) continue;
      int status = 0;
      pid_t r = ::waitpid(c.pid, &status, WNOHANG);
      if (r == 0) {
        any_running = true;
        continue;
      }
      c.running = false;
      if (r < 0) continue;
      const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
      if (failed && result == 0 && spawn_error.empty()) {
        result = exit_code(status);
        if (!stopping) {
          std::fprintf(stderr, "kiln launch: rank %d (pid %d) %s; stopping the other ranks\n", c.rank, c.pid,
                       describe(status).c_str());
          std::fflush(stderr);
          stopping = true;
          kill_at = Clock::now() + o.grace;
          signal_all(SIGTERM);
        }
      }
    }
    if (!any_running) break;
    if (g_signal != 0) {
      const int sig = g_signal;
      g_signal = 0;
      signal_all(sig);
      if (!stopping) {
        stopping = true;
        kill_at = Clock::now() + o.grace;
      }
    }
    if (stopping && !killed && Clock::now() >= kill_at) {
      signal_all(SIGKILL);
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  KILN_CHECK(spawn_error.empty(), "launch", "{}", spawn_error);
  return result;
}

}  // namespace kiln::dist
