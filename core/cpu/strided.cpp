// Broadcast strides for the strided loops.
#include "core/cpu/strided.h"

namespace kiln::cpu {

Shape broadcast_strides(const Tensor& t, const Shape& target) {
  const Shape& s = t.shape();
  const Shape& st = t.strides();
  KILN_CHECK(s.size() <= target.size(), "broadcast", "cannot broadcast {} to {}", shape_str(s), shape_str(target));
  Shape out(target.size(), 0);
  size_t lead = target.size() - s.size();
  for (size_t i = 0; i < s.size(); ++i) {
    KILN_CHECK(s[i] == target[lead + i] || s[i] == 1, "broadcast", "cannot broadcast {} to {}", shape_str(s), shape_str(target));
    out[lead + i] = s[i] == 1 ? 0 : st[i];
  }
  return out;
}

}  // namespace kiln::cpu
