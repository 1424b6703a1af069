// The TCP store's server: one thread, poll() over the listening socket, a wake-up pipe and every
// client connection. Blocking gets/waits park their connection until the keys arrive or the
// deadline passes; closed connections update their rank's state (left after bye, else lost).
#include "dist/store_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/socket.h"
#include "dist/store_protocol.h"

namespace kiln::dist {

const char* rank_state_name(RankState s) {
  switch (s) {
    case RankState::unknown: return "never connected";
    case RankState::connected: return "connected";
    case RankState::left: return "left";
    case RankState::lost: return "lost";
  }
  return "?";
}

namespace {

using net::Clock;

struct Conn {
  net::Socket sock;
  std::string in, out;
  int rank = -1;
  bool bye = false;
  bool closed = false;
  // A parked get (want_value) or wait.
  bool parked = false;
  bool want_value = false;
  std::vector<std::string> keys;
  Clock::time_point deadline;
};

struct RankInfo {
  RankState state = RankState::unknown;
  int conns = 0;
  Clock::time_point last_seen;
};

}  // namespace

struct StoreServer::State {
  net::Socket listener;
  int port = 0;
  int world_size = 0;
  std::chrono::milliseconds linger{0};
  int wake[2] = {-1, -1};
  std::thread thread;
  std::atomic<bool> stop{false};
  // Guarded by mutex: the number of open connections (the destructor waits for it to reach 0).
  std::mutex mutex;
  std::condition_variable cv;
  int open_conns = 0;
  // Owned by the server thread.
  std::vector<std::unique_ptr<Conn>> conns;
  std::map<std::string, std::string> data;
  std::vector<RankInfo> ranks;
  std::string abort_message;

  void loop();
  void handle(Conn& c, const std::string& frame);
  bool try_unpark(Conn& c);
  void unpark_all();
  void close_conn(Conn& c);

  static std::string reply_ok(net::Writer w = {}) { return net::Writer().u8(proto::ok).data() + w.data(); }
  static std::string reply_timeout() { return net::Writer().u8(proto::timed_out).data(); }
  static std::string reply_error(const std::string& m) { return net::Writer().u8(proto::error).str(m).data(); }
  static void queue(Conn& c, const std::string& payload) {
    const auto n = static_cast<uint32_t>(payload.size());
    char head[4] = {static_cast<char>(n & 0xff), static_cast<char>((n >> 8) & 0xff),
                    static_cast<char>((n >> 16) & 0xff), static_cast<char>((n >> 24) & 0xff)};
    c.out.append(head, 4);
    c.out += payload;
  }
};

StoreServer::StoreServer(int port, int world_size, std::chrono::milliseconds linger) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.listener = net::listen_tcp(port);
  net::set_nonblocking(s.listener);
  s.port = net::local_port(s.listener);
  s.world_size = world_size;
  s.linger = linger;
  s.ranks.resize(static_cast<size_t>(world_size));
  KILN_CHECK(::pipe2(s.wake, O_CLOEXEC) == 0, "store", "pipe failed: {}", std::strerror(errno));
  s.thread = std::thread([&s] { s.loop(); });
}

StoreServer::~StoreServer() {
  State& s = *state_;
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    s.cv.wait_for(lock, s.linger, [&] { return s.open_conns == 0; });
  }
  s.stop = true;
  char b = 1;
  [[maybe_unused]] auto n = ::write(s.wake[1], &b, 1);
  s.thread.join();
  ::close(s.wake[0]);
  ::close(s.wake[1]);
}

int StoreServer::port() const { return state_->port; }

bool StoreServer::State::try_unpark(Conn& c) {
  for (const std::string& k : c.keys) {
    if (!data.count(k)) return false;
  }
  c.parked = false;
  queue(c, c.want_value ? reply_ok(net::Writer().str(data[c.keys[0]])) : reply_ok());
  return true;
}

void StoreServer::State::unpark_all() {
  for (auto& c : conns) {
    if (c->parked) try_unpark(*c);
  }
}

void StoreServer::State::handle(Conn& c, const std::string& frame) {
  net::Reader r(frame);
  const auto cmd = static_cast<proto::Command>(r.u8());
  if (c.rank >= 0) ranks[static_cast<size_t>(c.rank)].last_seen = Clock::now();
  switch (cmd) {
    case proto::hello: {
      const int64_t rank = r.i64();
      if (rank >= 0 && rank < world_size && c.rank < 0) {
        c.rank = static_cast<int>(rank);
        RankInfo& info = ranks[static_cast<size_t>(rank)];
        info.conns++;
        if (info.state != RankState::lost) info.state = RankState::connected;
        info.last_seen = Clock::now();
      }
      queue(c, reply_ok());
      return;
    }
    case proto::set: {
      std::string k = r.str();
      data[k] = r.str();
      queue(c, reply_ok());
      unpark_all();
      return;
    }
    case proto::get:
    case proto::wait: {
      c.keys.clear();
      if (cmd == proto::get) {
        c.keys.push_back(r.str());
      } else {
        const int64_t n = r.i64();
        for (int64_t i = 0; i < n; ++i) c.keys.push_back(r.str());
      }
      c.want_value = cmd == proto::get;
      c.deadline = Clock::now() + std::chrono::milliseconds(r.i64());
      c.parked = true;
      try_unpark(c);
      return;
    }
    case proto::add: {
      std::string k = r.str();
      const int64_t delta = r.i64();
      int64_t v = 0;
      auto it = data.find(k);
      if (it != data.end()) {
        try {
          v = std::stoll(it->second);
        } catch (const std::exception&) {
          queue(c, reply_error("add: the value of '" + k + "' is not an integer"));
          return;
        }
      }
      v += delta;
      data[k] = std::to_string(v);
      queue(c, reply_ok(net::Writer().i64(v)));
      unpark_all();
      return;
    }
    case proto::check: {
      queue(c, reply_ok(net::Writer().u8(data.count(r.str()) ? 1 : 0)));
      return;
    }
    case proto::heartbeat: {
      std::string k = r.str();
      data[k] = r.str();
      net::Writer w;
      w.str(abort_message);
      std::vector<int> gone;
      for (int i = 0; i < world_size; ++i) {
        RankState st = ranks[static_cast<size_t>(i)].state;
        if (st == RankState::left || st == RankState::lost) gone.push_back(i);
      }
      w.i64(static_cast<int64_t>(gone.size()));
      for (int i : gone) w.i64(i).u8(static_cast<uint8_t>(ranks[static_cast<size_t>(i)].state));
      queue(c, reply_ok(w));
      unpark_all();
      return;
    }
    case proto::status: {
      const std::string prefix = r.str();
      net::Writer w;
      w.str(abort_message).i64(world_size);
      const auto now = Clock::now();
      for (int i = 0; i < world_size; ++i) {
        const RankInfo& info = ranks[static_cast<size_t>(i)];
        w.u8(static_cast<uint8_t>(info.state));
        w.i64(info.state == RankState::unknown
                  ? -1
                  : std::chrono::duration_cast<std::chrono::milliseconds>(now - info.last_seen).count());
        auto it = data.find(prefix + std::to_string(i));
        w.u8(it != data.end() ? 1 : 0).str(it != data.end() ? it->second : "");
      }
      queue(c, reply_ok(w));
      return;
    }
    case proto::abort: {
      std::string m = r.str();
      if (abort_message.empty()) abort_message = m;
      queue(c, reply_ok(net::Writer().str(abort_message)));
      return;
    }
    case proto::bye: {
      c.bye = true;
      queue(c, reply_ok());
      return;
    }
  }
  queue(c, reply_error("unknown command " + std::to_string(static_cast<int>(cmd))));
}

void StoreServer::State::close_conn(Conn& c) {
  c.closed = true;
  c.sock.close();
  if (c.rank >= 0) {
    RankInfo& info = ranks[static_cast<size_t>(c.rank)];
    info.conns--;
    if (!c.bye) {
      info.state = RankState::lost;
    } else if (info.conns == 0 && info.state == RankState::connected) {
      info.state = RankState::left;
    }
  }
  std::lock_guard<std::mutex> lock(mutex);
  open_conns--;
  cv.notify_all();
}

void StoreServer::State::loop() {
  std::vector<pollfd> fds;
  char buf[65536];
  while (!stop) {
    fds.clear();
    fds.push_back({listener.fd(), POLLIN, 0});
    fds.push_back({wake[0], POLLIN, 0});
    auto next = Clock::now() + std::chrono::seconds(1);
    for (auto& c : conns) {
      fds.push_back({c->sock.fd(), static_cast<short>(POLLIN | (c->out.empty() ? 0 : POLLOUT)), 0});
      if (c->parked && c->deadline < next) next = c->deadline;
    }
    auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now()).count();
    int n = ::poll(fds.data(), fds.size(), static_cast<int>(std::max<int64_t>(0, wait_ms)) + 1);
    if (n < 0 && errno != EINTR) break;
    if (stop) break;
    if (fds[0].revents & POLLIN) {
      for (;;) {
        int fd = ::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) break;
        auto c = std::make_unique<Conn>();
        c->sock = net::Socket(fd);
        net::set_nonblocking(c->sock);
        conns.push_back(std::move(c));
        std::lock_guard<std::mutex> lock(mutex);
        open_conns++;
      }
    }
    for (size_t i = 0; i < conns.size(); ++i) {
      Conn& c = *conns[i];
      const short ev = 2 + i < fds.size() ? fds[2 + i].revents : 0;
      if (ev & (POLLIN | POLLHUP | POLLERR)) {
        for (;;) {
          ssize_t k = ::recv(c.sock.fd(), buf, sizeof(buf), MSG_DONTWAIT);
          if (k > 0) {
            c.in.append(buf, static_cast<size_t>(k));
            continue;
          }
          if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) c.closed = true;
          break;
        }
      }
      // Frames, one at a time: a parked request holds the connection's next ones back.
      while (!c.parked && c.in.size() >= 4) {
        const auto* h = reinterpret_cast<const unsigned char*>(c.in.data());
        const uint32_t len = h[0] | (h[1] << 8) | (h[2] << 16) | (static_cast<uint32_t>(h[3]) << 24);
        if (c.in.size() < 4 + static_cast<size_t>(len)) break;
        std::string frame = c.in.substr(4, len);
        c.in.erase(0, 4 + static_cast<size_t>(len));
        try {
          handle(c, frame);
        } catch (const std::exception& e) {
          queue(c, reply_error(e.what()));
        }
      }
      if (!c.out.empty() && !c.closed) {
        ssize_t k = ::send(c.sock.fd(), c.out.data(), c.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) c.out.erase(0, static_cast<size_t>(k));
        else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) c.closed = true;
      }
    }
    const auto now = Clock::now();
    for (auto& c : conns) {
      if (c->parked && !c->closed && now >= c->deadline) {
        c->parked = false;
        queue(*c, reply_timeout());
        ssize_t k = ::send(c->sock.fd(), c->out.data(), c->out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) c->out.erase(0, static_cast<size_t>(k));
      }
    }
    for (size_t i = 0; i < conns.size();) {
      if (conns[i]->closed) {
        close_conn(*conns[i]);
        conns.erase(conns.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
  }
  for (auto& c : conns) close_conn(*c);
  conns.clear();
}

}  // namespace kiln::dist
