// Building and comparing the per-call records ranks exchange before a collective.
#include "dist/call_check.h"

#include <fmt/format.h>

namespace kiln::dist {

CallRecord make_record(const Call& call) {
  CallRecord r;
  r.kind = static_cast<uint8_t>(call.kind);
  r.op = static_cast<uint8_t>(call.op);
  r.root = call.root;
  r.seq = call.seq;
  if (call.input.defined()) {
    r.dtype = static_cast<uint8_t>(call.input.dtype());
    r.device_type = static_cast<uint8_t>(call.input.device().type);
    r.bytes = static_cast<int64_t>(call.input.nbytes());
  }
  return r;
}

namespace {
const char* device_type_name(uint8_t t) { return static_cast<DeviceType>(t) == DeviceType::cuda ? "cuda" : "cpu"; }
const char* kind_name(uint8_t k) { return collective_name(static_cast<Collective>(k)); }
}  // namespace

std::string compare_records(const CallRecord& a, int ra, const CallRecord& b, int rb) {
  const char* name = kind_name(b.kind);
  if (a.seq != b.seq) return fmt::format("[{}] rank {} is at collective #{}, rank {} at #{}", name, ra, a.seq, rb, b.seq);
  if (a.kind != b.kind)
    return fmt::format("[{}] rank {} called {} as collective #{}, rank {} called {}", name, ra, kind_name(a.kind), b.seq,
                       rb, name);
  if (static_cast<Collective>(b.kind) == Collective::barrier) return "";
  if (a.device_type != b.device_type)
    return fmt::format("[{}] rank {} gave a {} tensor, rank {} a {} tensor (collective #{})", name, ra,
                       device_type_name(a.device_type), rb, device_type_name(b.device_type), b.seq);
  if (a.dtype != b.dtype)
    return fmt::format("[{}] rank {} gave {}, rank {} gave {} (collective #{})", name, ra,
                       dtype_name(static_cast<DType>(a.dtype)), rb, dtype_name(static_cast<DType>(b.dtype)), b.seq);
  if (a.bytes != b.bytes)
    return fmt::format("[{}] rank {} gave {} bytes, rank {} gave {} (collective #{})", name, ra, a.bytes, rb, b.bytes,
                       b.seq);
  if (a.op != b.op)
    return fmt::format("[{}] rank {} asked for {}, rank {} for {} (collective #{})", name, ra,
                       reduce_op_name(static_cast<ReduceOp>(a.op)), rb, reduce_op_name(static_cast<ReduceOp>(b.op)),
                       b.seq);
  if (a.root != b.root)
    return fmt::format("[{}] rank {} named root {}, rank {} root {} (collective #{})", name, ra, a.root, rb, b.root,
                       b.seq);
  return "";
}

std::string compare_records(const std::vector<CallRecord>& records) {
  for (size_t r = 1; r < records.size(); ++r) {
    std::string d = compare_records(records[r], static_cast<int>(r), records[0], 0);
    if (!d.empty()) return d;
  }
  return "";
}

}  // namespace kiln::dist
