// The TCP store's wire protocol (internal): one request frame, one reply frame. A request is a
// command byte and its fields; a reply is a status byte and its fields (dist/socket.h frames them).
#pragma once
#include <cstdint>

namespace kiln::dist::proto {

enum Command : uint8_t {
  hello = 1,      // i64 rank (-1: not a rank)                        -> ok
  set = 2,        // str key, str value                               -> ok
  get = 3,        // str key, i64 timeout_ms                          -> ok str value | timeout
  add = 4,        // str key, i64 delta                               -> ok i64 value
  wait = 5,       // i64 n, n x str key, i64 timeout_ms               -> ok | timeout
  check = 6,      // str key                                          -> ok u8 present
  heartbeat = 7,  // str key, str value (sets it)                     -> ok str abort, i64 n, n x (i64 rank, u8 state)
  status = 8,     // str key prefix                                   -> ok str abort, i64 world,
                  //   world x (u8 state, i64 ms since seen or -1, u8 has value, str value of prefix + rank)
  abort = 9,      // str message (kept only if none yet)              -> ok str the kept message
  bye = 10,       // this connection ends cleanly                     -> ok
};

enum Status : uint8_t { ok = 0, timed_out = 1, error = 2 };  // error: str message

}  // namespace kiln::dist::proto
