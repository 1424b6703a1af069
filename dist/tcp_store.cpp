// The TcpStore client: one connection, one request at a time (a mutex), replies read with a deadline
// so a store that vanished (rank 0 died) is an error, never a hang.
#include "dist/tcp_store.h"

#include <algorithm>

#include "core/error.h"
#include "dist/store_protocol.h"

namespace kiln::dist {

using net::Clock;

namespace {
// How much longer than the server's own wait the client waits for a reply.
constexpr auto kReplyGrace = std::chrono::seconds(10);
}  // namespace

TcpStore::TcpStore(const std::string& host, int port, int rank, int world_size, bool serve,
                   std::chrono::milliseconds timeout)
    : host_(host), connect_host_(host), port_(port), rank_(rank), world_size_(world_size), timeout_(timeout) {
  KILN_CHECK(world_size >= 1 && rank >= -1 && rank < world_size, "store", "expected rank in [0, {}), found {}",
             world_size, rank);
  KILN_CHECK(port >= 0 && port < 65536, "store", "expected a port in [0, 65536), found {}", port);
  if (serve) {
    // At exit, rank 0 waits a little for the other ranks to say goodbye (the store may answer their last
    // requests), never as long as a stuck rank might take.
    server_ = std::make_shared<StoreServer>(port, world_size, std::min<std::chrono::milliseconds>(timeout, std::chrono::seconds(30)));
    port_ = server_->port();
    connect_host_ = "127.0.0.1";  // the server listens on every interface; its own process connects locally
  }
  connect();
}

TcpStore::TcpStore(std::string host, std::string connect_host, int port, int rank, int world_size,
                   std::shared_ptr<StoreServer> server, std::chrono::milliseconds timeout)
    : host_(std::move(host)), connect_host_(std::move(connect_host)), port_(port), rank_(rank), world_size_(world_size), timeout_(timeout),
      server_(std::move(server)) {
  connect();
}

void TcpStore::connect() {
  sock_ = net::connect_tcp(connect_host_, port_, Clock::now() + timeout_);
  request(net::Writer().u8(proto::hello).i64(rank_).data());
}

TcpStore::~TcpStore() {
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto deadline = Clock::now() + std::chrono::seconds(2);
    net::send_frame(sock_, net::Writer().u8(proto::bye).data(), deadline);
    std::string reply;
    net::recv_frame(sock_, reply, deadline);
  } catch (const std::exception&) {
    // The store is gone already: nothing to say goodbye to.
  }
  sock_.close();
}

std::shared_ptr<TcpStore> TcpStore::connect_again() const {
  return std::shared_ptr<TcpStore>(new TcpStore(host_, connect_host_, port_, rank_, world_size_, server_, timeout_));
}

std::string TcpStore::request(const std::string& payload, std::chrono::milliseconds server_wait,
                              const std::string& timeout_message) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto deadline = Clock::now() + server_wait + kReplyGrace;
  std::string reply;
  try {
    net::send_frame(sock_, payload, deadline);
    KILN_CHECK(net::recv_frame(sock_, reply, deadline), "store", "the store closed the connection");
  } catch (const Error& e) {
    KILN_FAIL("store", "lost the store at {}:{} (it runs in rank 0's process: rank 0 went missing?): {}", connect_host_, port_,
              e.what());
  }
  net::Reader r(reply);
  const uint8_t status = r.u8();
  if (status == proto::timed_out) throw Error(timeout_message);
  if (status == proto::error) KILN_FAIL("store", "{}", r.str());
  return reply.substr(1);
}

void TcpStore::set(const std::string& key, const std::string& value) {
  request(net::Writer().u8(proto::set).str(key).str(value).data());
}

std::string TcpStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  std::string rest = request(net::Writer().u8(proto::get).str(key).i64(timeout.count()).data(), timeout,
                             fmt::format("[store] timed out after {} waiting for '{}'", format_duration(timeout), key));
  net::Reader r(rest);
  return r.str();
}

int64_t TcpStore::add(const std::string& key, int64_t delta) {
  std::string rest = request(net::Writer().u8(proto::add).str(key).i64(delta).data());
  net::Reader r(rest);
  return r.i64();
}

void TcpStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  net::Writer w;
  w.u8(proto::wait).i64(static_cast<int64_t>(keys.size()));
  for (const std::string& k : keys) w.str(k);
  w.i64(timeout.count());
  request(w.data(), timeout,
          fmt::format("[store] timed out after {} waiting for {}", format_duration(timeout),
                      keys.size() == 1 ? "'" + keys[0] + "'" : fmt::format("{} keys", keys.size())));
}

bool TcpStore::contains(const std::string& key) {
  std::string rest = request(net::Writer().u8(proto::check).str(key).data());
  net::Reader r(rest);
  return r.u8() != 0;
}

std::pair<std::string, std::vector<std::pair<int, RankState>>> TcpStore::heartbeat(const std::string& key,
                                                                                     const std::string& value) {
  std::string rest = request(net::Writer().u8(proto::heartbeat).str(key).str(value).data());
  net::Reader r(rest);
  std::pair<std::string, std::vector<std::pair<int, RankState>>> out;
  out.first = r.str();
  const int64_t n = r.i64();
  for (int64_t i = 0; i < n; ++i) {
    const int rank = static_cast<int>(r.i64());
    out.second.emplace_back(rank, static_cast<RankState>(r.u8()));
  }
  return out;
}

StoreStatus TcpStore::status(const std::string& prefix) {
  std::string rest = request(net::Writer().u8(proto::status).str(prefix).data());
  net::Reader r(rest);
  StoreStatus s;
  s.abort_message = r.str();
  const int64_t n = r.i64();
  for (int64_t i = 0; i < n; ++i) {
    RankStatus rs;
    rs.state = static_cast<RankState>(r.u8());
    rs.ms_since_seen = r.i64();
    rs.has_value = r.u8() != 0;
    rs.value = r.str();
    s.ranks.push_back(std::move(rs));
  }
  return s;
}

std::string TcpStore::post_abort(const std::string& message) {
  std::string rest = request(net::Writer().u8(proto::abort).str(message).data());
  net::Reader r(rest);
  return r.str();
}

}  // namespace kiln::dist
