// Structure hashes and size positions of graphs; size profiles and their guards.
#include "compile/signature.h"

#include <cstring>
#include <typeinfo>

#include "core/ops/creation.h"

namespace kiln::compile {

uint64_t hash_combine(uint64_t h, uint64_t v) {
  uint64_t x = h ^ (v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2));
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 29;
  return x;
}

bool is_runtime_attr(const Primitive& op, const Attr& a) {
  const bool random = dynamic_cast<const prim::Random*>(&op) || dynamic_cast<const prim::Dropout*>(&op);
  return random && (std::strcmp(a.name, "seed") == 0 || std::strcmp(a.name, "offset") == 0);
}

bool is_size_attr(const Attr& a) {
  if (!std::holds_alternative<int64_t>(a.value) && !std::holds_alternative<std::vector<int64_t>>(a.value)) return false;
  static const char* const names[] = {"shape", "in_shape", "a_shape", "b_shape", "start", "end", "sizes", "n",
                                      "num_embeddings"};
  for (const char* n : names)
    if (std::strcmp(a.name, n) == 0) return true;
  return false;
}

namespace {

struct Hasher {
  uint64_t h;
  std::vector<int64_t>& sizes;
  void mix(uint64_t v) { h = hash_combine(h, v); }
  void shape(const Shape& s) {
    mix(s.size());
    sizes.insert(sizes.end(), s.begin(), s.end());
  }
  void meta(const TensorMeta& m) {
    mix(static_cast<uint64_t>(m.dtype));
    mix(static_cast<uint64_t>(m.device.type) * 1000 + static_cast<uint64_t>(m.device.index));
  }
};

}  // namespace

Signature signature(const Graph& g, uint64_t seed) {
  Signature sig;
  Hasher hs{hash_combine(seed, g.values.size()), sig.sizes};
  sig.value_pos.assign(g.values.size(), -1);
  for (int v : g.inputs) {
    const Value& val = g.values[static_cast<size_t>(v)];
    hs.mix(static_cast<uint64_t>(v));
    hs.mix(static_cast<uint64_t>(val.input.kind) * 1000003ull + static_cast<uint64_t>(val.input.index));
    hs.mix(val.requires_grad);
    hs.meta(val.meta);
    sig.value_pos[static_cast<size_t>(v)] = static_cast<int>(sig.sizes.size());
    hs.shape(val.meta.shape);
  }
  for (const Node& n : g.nodes) {
    hs.mix(typeid(*n.op).hash_code());
    for (const Attr& a : n.op->attrs()) {
      if (is_runtime_attr(*n.op, a)) continue;
      if (is_size_attr(a)) {
        if (const auto* i = std::get_if<int64_t>(&a.value)) {
          sig.sizes.push_back(*i);
        } else {
          hs.shape(std::get<std::vector<int64_t>>(a.value));
        }
        continue;
      }
      hs.mix(attr_hash(a.value));
    }
    hs.mix(n.inputs.size());
    for (int v : n.inputs) hs.mix(static_cast<uint64_t>(v));
    hs.mix(n.outputs.size());
    for (int v : n.outputs) {
      hs.mix(static_cast<uint64_t>(v));
      hs.meta(g.values[static_cast<size_t>(v)].meta);
      sig.value_pos[static_cast<size_t>(v)] = static_cast<int>(sig.sizes.size());
      hs.shape(g.values[static_cast<size_t>(v)].meta.shape);
    }
  }
  hs.mix(g.outputs.size());
  for (int v : g.outputs) hs.mix(static_cast<uint64_t>(v));
  sig.hash = hs.h;
  return sig;
}

bool SizeProfile::matches(const std::vector<int64_t>& sizes) const {
  if (sizes.size() != values.size()) return false;
  for (size_t i = 0; i < sizes.size(); ++i)
    if (!dynamic[i] && sizes[i] != values[i]) return false;
  return true;
}

int SizeProfile::widen(const std::vector<int64_t>& sizes) {
  int changed = 0;
  for (size_t i = 0; i < sizes.size() && i < values.size(); ++i)
    if (!dynamic[i] && sizes[i] != values[i]) {
      dynamic[i] = true;
      ++changed;
    }
  return changed;
}

int SizeProfile::num_dynamic() const {
  int n = 0;
  for (bool d : dynamic) n += d;
  return n;
}

int64_t SizeProfile::static_dim(const Signature& sig, int v, int dim) const {
  const int p = sig.value_pos[static_cast<size_t>(v)] + dim;
  return dynamic[static_cast<size_t>(p)] ? -1 : values[static_cast<size_t>(p)];
}

SizeProfile initial_profile(const Signature& sig, const std::vector<std::pair<int, int>>& dynamic_dims,
                            const std::vector<Tensor>& args) {
  SizeProfile p;
  p.values = sig.sizes;
  p.dynamic.assign(sig.sizes.size(), false);
  std::vector<int64_t> marked;
  for (auto [a, d] : dynamic_dims) {
    KILN_CHECK(a >= 0 && a < static_cast<int>(args.size()), "compile", "dynamic_dims names argument {} of {}", a,
               args.size());
    const int64_t dim = wrap_dim(d, args[static_cast<size_t>(a)].dim(), "compile");
    marked.push_back(args[static_cast<size_t>(a)].size(dim));
  }
  for (size_t i = 0; i < p.values.size(); ++i)
    for (int64_t m : marked)
      if (m > 0 && p.values[i] != 0 && p.values[i] % m == 0) p.dynamic[i] = true;
  return p;
}

std::string profile_shape_str(const Graph& g, const Signature& sig, const SizeProfile& p, int v) {
  const Shape& s = g.values[static_cast<size_t>(v)].meta.shape;
  std::string out = "(";
  for (size_t d = 0; d < s.size(); ++d) {
    const int64_t st = p.static_dim(sig, v, static_cast<int>(d));
    if (d) out += ", ";
    out += st < 0 ? std::string("s") : std::to_string(st);
  }
  return out + (s.size() == 1 ? ",)" : ")");
}

}  // namespace kiln::compile
