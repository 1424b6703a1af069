// The record of one collective call that ranks exchange before running it, so a call that differs
// across ranks (another collective, dtype, device type, byte count, reduce op or root) fails on every
// rank with the same clear error instead of hanging or mixing bytes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dist/process_group.h"

namespace kiln::dist {

struct CallRecord {
  uint8_t kind = 0;         // Collective
  uint8_t dtype = 0;        // DType (0 for barrier)
  uint8_t device_type = 0;  // DeviceType
  uint8_t op = 0;           // ReduceOp
  int32_t root = 0;
  uint64_t seq = 0;
  int64_t bytes = 0;  // the input's size (all_gather, reduce_scatter) or the tensor's (all_reduce, broadcast)
};
static_assert(sizeof(CallRecord) == 24, "CallRecord travels as raw bytes");

CallRecord make_record(const Call& call);
// "" when every rank's record agrees with rank 0's, else the error for the first rank that differs,
// e.g. "[all_gather] rank 1 gave 12 bytes, rank 0 gave 16 (collective #3)". records[r] is rank r's.
std::string compare_records(const std::vector<CallRecord>& records);
// The same for two ranks' records: "" when `a` (rank_a's) agrees with `b` (rank_b's).
std::string compare_records(const CallRecord& a, int rank_a, const CallRecord& b, int rank_b);

}  // namespace kiln::dist
