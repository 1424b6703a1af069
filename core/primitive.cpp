// Primitive identity: equality and hashing of the typed attribute lists (attrs()), and their
// "key=value" printing.
#include "core/primitive.h"

#include <bit>
#include <functional>
#include <typeinfo>

namespace kiln {
namespace {

size_t hash_combine(size_t seed, size_t v) { return seed ^ (v + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2)); }

template <class... F>
struct Overload : F... {
  using F::operator()...;
};
template <class... F>
Overload(F...) -> Overload<F...>;

}  // namespace

bool attr_equal(const AttrValue& a, const AttrValue& b) {
  if (a.index() != b.index()) return false;
  return std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        const T& y = std::get<T>(b);
        if constexpr (std::is_same_v<T, double>) {
          return std::bit_cast<uint64_t>(x) == std::bit_cast<uint64_t>(y);
        } else if constexpr (std::is_same_v<T, EnumAttr>) {
          return x.value == y.value;
        } else if constexpr (std::is_same_v<T, ObjectAttr>) {
          return x.ptr == y.ptr;
        } else {
          return x == y;
        }
      },
      a);
}

size_t attr_hash(const AttrValue& v) {
  const size_t h =
      std::visit(Overload{
                     [](int64_t x) { return std::hash<int64_t>{}(x); },
                     [](double x) { return std::hash<uint64_t>{}(std::bit_cast<uint64_t>(x)); },
                     [](bool x) { return std::hash<bool>{}(x); },
                     [](const std::string& x) { return std::hash<std::string>{}(x); },
                     [](const std::vector<int64_t>& x) {
                       size_t s = std::hash<size_t>{}(x.size());
                       for (int64_t e : x) s = hash_combine(s, std::hash<int64_t>{}(e));
                       return s;
                     },
                     [](DType x) { return std::hash<int>{}(static_cast<int>(x)); },
                     [](const Device& x) {
                       return hash_combine(std::hash<int>{}(static_cast<int>(x.type)), std::hash<int>{}(x.index));
                     },
                     [](const EnumAttr& x) { return std::hash<int64_t>{}(x.value); },
                     [](const ObjectAttr& x) { return std::hash<const void*>{}(x.ptr); },
                 },
                 v);
  return hash_combine(v.index(), h);
}

std::string attr_str(const AttrValue& v) {
  return std::visit(Overload{
                        [](int64_t x) { return fmt::format("{}", x); },
                        [](double x) { return fmt::format("{}", x); },
                        [](bool x) { return std::string(x ? "true" : "false"); },
                        [](const std::string& x) { return x; },
                        [](const std::vector<int64_t>& x) { return shape_str(x); },
                        [](DType x) { return std::string(dtype_name(x)); },
                        [](const Device& x) { return x.str(); },
                        [](const EnumAttr& x) { return x.label ? std::string(x.label) : fmt::format("{}", x.value); },
                        [](const ObjectAttr& x) { return fmt::format("{}", fmt::ptr(x.ptr)); },
                    },
                    v);
}

bool Primitive::equals(const Primitive& other) const {
  if (this == &other) return true;
  if (typeid(*this) != typeid(other)) return false;
  const std::vector<Attr> a = attrs(), b = other.attrs();
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!attr_equal(a[i].value, b[i].value)) return false;
  }
  return true;
}

size_t Primitive::hash() const {
  size_t h = typeid(*this).hash_code();
  for (const Attr& a : attrs()) h = hash_combine(h, attr_hash(a.value));
  return h;
}

std::string Primitive::attributes() const {
  std::string s;
  for (const Attr& a : attrs()) {
    if (!s.empty()) s += ", ";
    s += a.name;
    s += '=';
    s += attr_str(a.value);
  }
  return s;
}

}  // namespace kiln
