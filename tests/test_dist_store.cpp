// dist/'s stores: HashStore and TcpStore (set/get/add/wait/contains, blocking gets served when another
// rank sets the key, timeouts as errors), check_same across ranks, the server's view of its ranks
// (left after bye, lost when a connection breaks), and errors when the store is unreachable or gone.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <chrono>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "dist/socket.h"
#include "dist/store_protocol.h"
#include "dist/tcp_store.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
using std::chrono::milliseconds;

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

TEST_CASE("HashStore sets, gets, adds and times out", "[dist]") {
  dist::HashStore s;
  s.set("a", "1");
  REQUIRE(s.get("a", milliseconds(10)) == "1");
  REQUIRE(s.add("n", 2) == 2);
  REQUIRE(s.add("n", -5) == -3);
  REQUIRE(s.contains("n"));
  REQUIRE_FALSE(s.contains("b"));
  std::thread t([&] {
    std::this_thread::sleep_for(milliseconds(30));
    s.set("b", "late");
  });
  REQUIRE(s.get("b", milliseconds(2000)) == "late");
  t.join();
  REQUIRE_THROWS_WITH(s.wait({"a", "missing"}, milliseconds(50)), "[store] timed out after 50 ms waiting for 'missing'");
}

TEST_CASE("TcpStore serves set/get/add/wait/contains between ranks", "[dist]") {
  dist::TcpStore server("127.0.0.1", 0, 0, 3, /*serve=*/true, milliseconds(5000));
  REQUIRE(server.port() > 0);
  dist::TcpStore one("127.0.0.1", server.port(), 1, 3, false, milliseconds(5000));
  dist::TcpStore two("127.0.0.1", server.port(), 2, 3, false, milliseconds(5000));
  server.set("k", std::string("v\0w", 3));
  REQUIRE(one.get("k", milliseconds(100)) == std::string("v\0w", 3));  // bytes, not C strings
  REQUIRE(two.contains("k"));
  REQUIRE_FALSE(two.contains("nope"));
  // A get blocks until another rank sets the key.
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(50));
    two.set("late", "here");
  });
  REQUIRE(one.get("late", milliseconds(3000)) == "here");
  setter.join();
  // Concurrent adds from three ranks are atomic.
  std::vector<std::thread> adders;
  for (dist::TcpStore* s : {&server, &one, &two})
    adders.emplace_back([s] {
      for (int i = 0; i < 50; ++i) s->add("count", 1);
    });
  for (auto& t : adders) t.join();
  REQUIRE(server.add("count", 0) == 150);
  one.set("x", "1");
  two.wait({"k", "x", "count"}, milliseconds(100));
  const auto start = Clock::now();
  REQUIRE_THROWS_WITH(two.get("never", milliseconds(200)), "[store] timed out after 200 ms waiting for 'never'");
  REQUIRE(seconds_since(start) < 2.0);
  REQUIRE_THROWS_WITH(one.wait({"k", "never"}, milliseconds(100)), ContainsSubstring("timed out after 100 ms waiting for 2 keys"));
  REQUIRE_THROWS_WITH(server.add("k", 1), ContainsSubstring("is not an integer"));
  REQUIRE(one.get("k", milliseconds(100)).size() == 3);  // the connection survives an error reply
}

TEST_CASE("check_same across TcpStore ranks names the rank whose value differs", "[dist]") {
  dist::TcpStore server("127.0.0.1", 0, 0, 3, true, milliseconds(5000));
  std::vector<std::unique_ptr<dist::TcpStore>> stores;
  stores.emplace_back(nullptr);
  for (int r = 1; r < 3; ++r) stores.push_back(std::make_unique<dist::TcpStore>("127.0.0.1", server.port(), r, 3, false));
  std::mutex mutex;
  std::vector<std::string> errors(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      dist::Store& s = r == 0 ? static_cast<dist::Store&>(server) : *stores[static_cast<size_t>(r)];
      dist::check_same(s, r, 3, "model", "llama", milliseconds(3000));
      try {
        dist::check_same(s, r, 3, "model", r == 1 ? "qwen" : "llama", milliseconds(3000));
      } catch (const Error& e) {
        std::lock_guard<std::mutex> lock(mutex);
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const std::string& e : errors)
    REQUIRE(e == "[check_same] setting 'model' differs across ranks: rank 1 has 'qwen', rank 0 has 'llama'");
}

TEST_CASE("the store tells ranks that left from ranks that went missing", "[dist]") {
  dist::TcpStore server("127.0.0.1", 0, 0, 4, true, milliseconds(2000));
  {
    dist::TcpStore one("127.0.0.1", server.port(), 1, 4, false);
    one.set("kiln/progress/g/1", "3 3");
  }  // says bye
  {
    // Rank 2's connection breaks without a bye (its process died).
    dist::net::Socket raw = dist::net::connect_tcp("127.0.0.1", server.port(), Clock::now() + std::chrono::seconds(2));
    const auto deadline = Clock::now() + std::chrono::seconds(2);
    dist::net::send_frame(raw, dist::net::Writer().u8(dist::proto::hello).i64(2).data(), deadline);
    std::string reply;
    REQUIRE(dist::net::recv_frame(raw, reply, deadline));
  }
  dist::StoreStatus st;
  for (int i = 0; i < 100; ++i) {  // the server sees the closed sockets on its next poll
    st = server.status("kiln/progress/g/");
    if (st.ranks[1].state == dist::RankState::left && st.ranks[2].state == dist::RankState::lost) break;
    std::this_thread::sleep_for(milliseconds(10));
  }
  REQUIRE(st.ranks.size() == 4);
  REQUIRE(st.ranks[0].state == dist::RankState::connected);
  REQUIRE(st.ranks[1].state == dist::RankState::left);
  REQUIRE(st.ranks[1].has_value);
  REQUIRE(st.ranks[1].value == "3 3");
  REQUIRE(st.ranks[2].state == dist::RankState::lost);
  REQUIRE(st.ranks[3].state == dist::RankState::unknown);
  REQUIRE(st.ranks[3].ms_since_seen == -1);
  auto [abort, gone] = server.heartbeat("kiln/progress/g/0", "0 0");
  REQUIRE(abort.empty());
  REQUIRE(gone == std::vector<std::pair<int, dist::RankState>>{{1, dist::RankState::left}, {2, dist::RankState::lost}});
  REQUIRE(server.post_abort("first") == "first");
  REQUIRE(server.post_abort("second") == "first");
  REQUIRE(server.status("").abort_message == "first");
}

TEST_CASE("an unreachable or vanished store is an error, not a hang", "[dist]") {
  const int port = [] {
    dist::net::Socket s = dist::net::listen_tcp(0);
    return dist::net::local_port(s);
  }();  // nothing listens there now
  auto start = Clock::now();
  REQUIRE_THROWS_WITH(dist::TcpStore("127.0.0.1", port, 1, 2, false, milliseconds(300)),
                      ContainsSubstring("could not connect to the store at 127.0.0.1:" + std::to_string(port)));
  REQUIRE(seconds_since(start) < 3.0);

  auto server = std::make_unique<dist::TcpStore>("127.0.0.1", 0, 0, 2, true, milliseconds(100));
  dist::TcpStore client("127.0.0.1", server->port(), 1, 2, false, milliseconds(2000));
  client.set("a", "1");
  server.reset();  // rank 0 ends; its server waits 100 ms for clients, then stops
  start = Clock::now();
  REQUIRE_THROWS_WITH(client.get("a", milliseconds(1000)), ContainsSubstring("rank 0 went missing"));
  REQUIRE(seconds_since(start) < 3.0);
}
