// safetensors io: round trips of every dtype and awkward shapes, fixtures written by the Python
// `safetensors` package (tools/make_safetensors_fixtures.py), sharded checkpoints, and corrupt files
// (written here) that must raise kiln::Error naming the file and the key or offset.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

// A fresh empty folder under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() / fmt::format("kiln_st_{}_{}", ::getpid(), rd());
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// The fixture folder tests/data/safetensors (tests/helpers.h says where it is looked for).
fs::path fixtures() {
  const fs::path dir = test::test_data("safetensors");
  if (!fs::exists(dir / "dtypes.safetensors")) FAIL("safetensors fixtures not found (set KILN_TEST_DATA to the tests/data folder)");
  return dir;
}

std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
// A file with the given header text (length prefix computed) followed by `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::vector<unsigned char> b(8);
  for (int i = 0; i < 8; ++i) b[static_cast<size_t>(i)] = static_cast<unsigned char>(header.size() >> (8 * i));
  b.insert(b.end(), header.begin(), header.end());
  b.resize(b.size() + data_bytes, 0);
  write_bytes(path, b);
}

void require_open_error(const std::string& path, const std::string& needle) {
  REQUIRE_THROWS_MATCHES(io::SafetensorsFile::open(path), Error,
                         Catch::Matchers::MessageMatches(ContainsSubstring(needle) && ContainsSubstring(path)));
}

const DType kAllDTypes[] = {DType::f64, DType::f32, DType::bf16, DType::f16,
                            DType::i64, DType::i32, DType::u8,   DType::boolean};

}  // namespace

TEST_CASE("safetensors round trip of every dtype and odd shapes", "[safetensors]") {
  TempDir tmp;
  const std::vector<Shape> shapes = {{}, {0}, {3, 0, 2}, {1}, {7}, {2, 3, 5}, {1, 1, 9, 1}};
  std::vector<std::pair<std::string, Tensor>> tensors;
  uint64_t seed = 1;
  for (DType d : kAllDTypes)
    for (size_t i = 0; i < shapes.size(); ++i)
      tensors.emplace_back(fmt::format("{}.{}", dtype_name(d), i), test::random_tensor(shapes[i], d, seed++));
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "a \"quoted\" value\n"}};
  io::save_safetensors(tmp.file("all.safetensors"), tensors, meta);
  // Only the final file remains (the temporary one was renamed).
  REQUIRE(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);

  auto f = io::SafetensorsFile::open(tmp.file("all.safetensors"));
  REQUIRE(f.metadata() == meta);
  REQUIRE(f.keys().size() == tensors.size());
  for (const auto& [name, t] : tensors) {
    INFO(name);
    REQUIRE(f.contains(name));
    Tensor r = f.get(name);
    REQUIRE(r.dtype() == t.dtype());
    REQUIRE(r.shape() == t.shape());
    REQUIRE(r.device().is_cpu());
    REQUIRE(f.info(name).shape == t.shape());
    test::require_equal(r, t);
  }
  // The header is padded to 8 bytes, so the data section starts aligned.
  auto bytes = read_bytes(tmp.file("all.safetensors"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<size_t>(i)];
  REQUIRE(n % 8 == 0);
}

TEST_CASE("safetensors writes non-contiguous inputs and overwrites atomically", "[safetensors]") {
  TempDir tmp;
  Tensor a = test::random_tensor({4, 6}, DType::f32, 11, /*noncontiguous=*/true);
  Tensor base = test::random_tensor({5, 8}, DType::bf16, 12);
  Tensor b = base.t();                                                 // (8, 5) transposed view
  Tensor c = base.slice(1, 1, 8, 3);                                   // (5, 3) strided view
  Tensor e = test::random_tensor({3}, DType::i64, 13).expand({4, 3});  // stride 0
  std::string path = tmp.file("views.safetensors");
  io::save_safetensors(path, {{"old", ones({2})}});
  io::save_safetensors(path, {{"a", a}, {"b", b}, {"c", c}, {"e", e}});
  REQUIRE(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
  auto f = io::SafetensorsFile::open(path);
  REQUIRE(f.keys() == std::vector<std::string>{"a", "b", "c", "e"});
  test::require_equal(f.get("a"), a);
  test::require_equal(f.get("b"), b);
  test::require_equal(f.get("c"), c);
  test::require_equal(f.get("e"), e);
  REQUIRE(f.get("e").shape() == Shape{4, 3});
}

TEST_CASE("safetensors tensors outlive the file object and never write to the file", "[safetensors]") {
  TempDir tmp;
  std::string path = tmp.file("t.safetensors");
  Tensor x = from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  io::save_safetensors(path, {{"x", x}});
  Tensor r;
  {
    auto f = io::SafetensorsFile::open(path);
    r = f.get("x");
  }
  test::require_equal(r, x);
  r.fill_(7.0);  // copy-on-write mapping: the file keeps its values
  REQUIRE(r.to_vector<float>() == std::vector<float>(6, 7.0f));
  test::require_equal(io::SafetensorsFile::open(path).get("x"), x);
}

TEST_CASE("safetensors copies tensors whose bytes are misaligned for their dtype", "[safetensors]") {
  TempDir tmp;
  std::string p = tmp.file("odd.safetensors");
  write_raw(p, R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                  "b": {"dtype": "F32", "shape": [], "data_offsets": [1, 5]}})", 5);
  auto bytes = read_bytes(p);
  float v = 2.75f;
  std::memcpy(&bytes[bytes.size() - 4], &v, 4);
  write_bytes(p, bytes);
  auto f = io::SafetensorsFile::open(p);
  REQUIRE(f.get("b").item<float>() == 2.75f);
  REQUIRE(f.get("a").item<int64_t>() == 0);
}

TEST_CASE("safetensors reads files written by the Python package", "[safetensors]") {
  std::string path = (fixtures() / "dtypes.safetensors").string();
  auto f = io::SafetensorsFile::open(path);
  REQUIRE(f.metadata() == std::map<std::string, std::string>{{"format", "np"}, {"note", "kiln fixture"}});
  REQUIRE(f.keys() == std::vector<std::string>{"bf16", "bool", "empty", "f16", "f32", "f64", "i32", "i64", "scalar", "u8"});

  std::vector<double> f64;
  for (int i = 0; i < 6; ++i) f64.push_back(i * 0.25 - 1.5);
  test::require_equal(f.get("f64"), from_vector<double>(f64, {2, 3}));
  std::vector<float> f32;
  for (int i = 0; i < 12; ++i) f32.push_back(static_cast<float>(i) * 0.5f - 3.0f);
  test::require_equal(f.get("f32"), from_vector<float>(f32, {3, 4}));

  auto bits = [](const auto& v) {
    std::vector<uint16_t> out;
    for (const auto& h : v) out.push_back(h.bits);
    return out;
  };
  Tensor b = f.get("bf16");
  REQUIRE(b.dtype() == DType::bf16);
  REQUIRE(b.shape() == Shape{2, 3});
  REQUIRE(bits(b.to_vector<bf16>()) == std::vector<uint16_t>{0x3F80, 0xC020, 0x3E20, 0x4049, 0x8000, 0x7F80});
  REQUIRE(static_cast<float>(b.to_vector<bf16>()[3]) == 3.140625f);
  Tensor h = f.get("f16");
  REQUIRE(h.dtype() == DType::f16);
  REQUIRE(bits(h.to_vector<f16>()) == std::vector<uint16_t>{0x3C00, 0xC100, 0x3555, 0x7BFF, 0x0001});
  REQUIRE(static_cast<float>(h.to_vector<f16>()[1]) == -2.5f);

  REQUIRE(f.get("i64").to_vector<int64_t>() ==
          std::vector<int64_t>{-(int64_t{1} << 40), -1, 0, 7, int64_t{1} << 62});
  std::vector<int32_t> i32;
  for (int i = -6; i < 6; ++i) i32.push_back(i);
  REQUIRE(f.get("i32").shape() == Shape{3, 2, 2});
  REQUIRE(f.get("i32").to_vector<int32_t>() == i32);
  REQUIRE(f.get("u8").to_vector<uint8_t>() == std::vector<uint8_t>{0, 1, 127, 200, 255});
  REQUIRE(f.get("bool").dtype() == DType::boolean);
  REQUIRE(f.get("bool").to_vector<bool>() == std::vector<bool>{true, false, false, true});
  Tensor s = f.get("scalar");
  REQUIRE(s.dim() == 0);
  REQUIRE(s.item<float>() == 42.5f);
  REQUIRE(f.get("empty").shape() == Shape{0, 3});
  REQUIRE(f.get("empty").numel() == 0);
}

TEST_CASE("safetensors reads a sharded checkpoint written by Python", "[safetensors]") {
  std::string dir = (fixtures() / "sharded").string();
  auto ck = io::ShardedCheckpoint::open(dir);
  REQUIRE(ck.keys() == std::vector<std::string>{"layer.0.bias", "layer.0.weight", "layer.1.weight", "step"});
  REQUIRE(ck.shard_of("step") == "model-00002-of-00002.safetensors");
  REQUIRE_THROWS_MATCHES(ck.get("nope"), Error, Catch::Matchers::MessageMatches(ContainsSubstring("'nope'")));

  auto all = io::load_sharded(dir);
  REQUIRE(all.size() == 4);
  std::vector<float> w0;
  for (int i = 0; i < 12; ++i) w0.push_back(static_cast<float>(i) * 0.25f);
  test::require_equal(all.at("layer.0.weight"), from_vector<float>(w0, {4, 3}));
  test::require_equal(all.at("layer.0.bias"), from_vector<float>({1.5f, -1.5f, 0.0f, 2.0f}, {4}));
  test::require_equal(all.at("layer.1.weight"), from_vector<double>({-2, -1, 0, 1, 2, 3}, {2, 3}));
  REQUIRE(all.at("step").to_vector<int64_t>() == std::vector<int64_t>{123456789});
}

TEST_CASE("safetensors writes sharded checkpoints with an index", "[safetensors]") {
  TempDir tmp;
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"a", test::random_tensor({10}, DType::f32, 21)},        // 40 bytes
      {"b", test::random_tensor({4, 4}, DType::bf16, 22)},     // 32 bytes
      {"c", test::random_tensor({30}, DType::f64, 23)},        // 240 bytes: bigger than a shard
      {"d", test::random_tensor({2, 3}, DType::i32, 24, true)},  // 24 bytes
  };
  auto names = io::save_sharded(tmp.path.string(), tensors, 100, {{"format", "pt"}});
  REQUIRE(names == std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                            "model-00003-of-00003.safetensors"});
  std::ifstream in(tmp.file("model.safetensors.index.json"));
  auto index = nlohmann::json::parse(in);
  REQUIRE(index["metadata"]["total_size"] == 336);
  REQUIRE(index["weight_map"]["a"] == names[0]);
  REQUIRE(index["weight_map"]["b"] == names[0]);
  REQUIRE(index["weight_map"]["c"] == names[1]);
  REQUIRE(index["weight_map"]["d"] == names[2]);
  auto ck = io::ShardedCheckpoint::open(tmp.path.string());
  for (const auto& [k, t] : tensors) test::require_equal(ck.get(k), t);
  REQUIRE(io::SafetensorsFile::open(tmp.file(names[1])).metadata().at("format") == "pt");

  // An index naming a shard that lacks the key is an error naming both.
  io::save_safetensors(tmp.file(names[2]), {{"other", ones({1})}});
  REQUIRE_THROWS_MATCHES(io::ShardedCheckpoint::open(tmp.path.string()), Error,
                         Catch::Matchers::MessageMatches(ContainsSubstring("'d'") && ContainsSubstring(names[2])));
}

TEST_CASE("safetensors rejects corrupt files with the key or offset in the message", "[safetensors]") {
  TempDir tmp;
  std::string p = tmp.file("bad.safetensors");

  write_bytes(p, {1, 2, 3, 4, 5});
  require_open_error(p, "shorter than the 8-byte header length");
  write_raw(p, "{}", 0);
  auto b = read_bytes(p);
  b[0] = 0xff;
  b[5] = 0x01;
  write_bytes(p, b);
  require_open_error(p, "goes beyond the file");
  write_raw(p, "{\"x\": {\"dtype\": \"F32\", ", 16);
  require_open_error(p, "malformed JSON");
  write_raw(p, "[1, 2]", 0);
  require_open_error(p, "expected an object");
  write_raw(p, R"({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", 2);
  require_open_error(p, "tensor 'w' has unknown dtype 'F8_E4M3'");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}})", 8);
  require_open_error(p, "'w'");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8);
  require_open_error(p, "tensor 'w' has data_offsets [0, 8] (8 bytes) but dtype F32 shape [3] needs 12 bytes");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4);
  require_open_error(p, "tensor 'w' has data_offsets [0, 8] beyond the data section (4 bytes");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", 8);
  require_open_error(p, "tensor 'w' has data_offsets [8, 0] with begin after end");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12);
  require_open_error(p, "tensor 'v' at data offset 4 overlaps");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", 8);
  require_open_error(p, "tensor 'w' starts at data offset 4, leaving a gap");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 8);
  require_open_error(p, "tensors end at data offset 4 but the data section holds 8 bytes");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [1]}})", 4);
  require_open_error(p, "tensor 'w' needs 'data_offsets'");
  write_raw(p, R"({"__metadata__": {"n": 3}})", 0);
  require_open_error(p, "__metadata__ entry 'n'");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 4]}})", 4);
  require_open_error(p, "tensor 'w' has a shape whose size overflows");
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');  // no recursion on bad input
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [)" + deep + R"(], "data_offsets": [0, 4]}})", 4);
  require_open_error(p, "tensor 'w' has a shape entry array");

  io::save_safetensors(p, {{"x", ones({3})}});
  REQUIRE_THROWS_MATCHES(io::SafetensorsFile::open(p).get("y"), Error,
                         Catch::Matchers::MessageMatches(ContainsSubstring("no tensor named 'y'") && ContainsSubstring(p)));
  REQUIRE_THROWS_AS(io::SafetensorsFile::open(tmp.file("missing.safetensors")), Error);
  REQUIRE_THROWS_AS(io::load_sharded(tmp.path.string()), Error);  // no index
}

TEST_CASE("safetensors survives truncated and corrupted files", "[safetensors]") {
  TempDir tmp;
  std::string good = tmp.file("good.safetensors");
  io::save_safetensors(good, {{"a", test::random_tensor({3, 2}, DType::f32, 31)},
                              {"b", test::random_tensor({5}, DType::bf16, 32)},
                              {"c", test::random_tensor({}, DType::i64, 33)}},
                       {{"k", "v"}});
  const auto bytes = read_bytes(good);
  std::string p = tmp.file("cut.safetensors");
  // Every truncation is an error (the data section no longer matches the header).
  for (size_t len = 0; len < bytes.size(); ++len) {
    write_bytes(p, std::vector<unsigned char>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(len)));
    INFO("length " << len);
    REQUIRE_THROWS_AS(io::SafetensorsFile::open(p), Error);
  }
  // Random byte flips: either a valid file whose tensors read back, or a kiln::Error.
  std::mt19937 rng(1234);
  int errors = 0;
  for (int trial = 0; trial < 300; ++trial) {
    auto c = bytes;
    int flips = 1 + static_cast<int>(rng() % 3);
    for (int i = 0; i < flips; ++i) c[rng() % c.size()] = static_cast<unsigned char>(rng());
    write_bytes(p, c);
    try {
      auto f = io::SafetensorsFile::open(p);
      for (const auto& k : f.keys()) (void)cast(f.get(k), DType::f64).to_vector<double>();
    } catch (const Error&) {
      ++errors;
    }
  }
  REQUIRE(errors > 0);
}
