// A tiny character-level language model trained end to end with kiln's autograd on the CPU:
// embedding of a window of characters -> 2-layer MLP -> cross-entropy, nn's Adam (AdamW without weight
// decay) or SGD. Trains on Genesis 1 (KJV) by default, or on --text FILE; ends with a greedy sample.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "nn/optim.h"

using namespace kiln;

namespace {

// Genesis 1:1-10, King James Version (public domain).
constexpr const char* kDefaultText =
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided the "
    "light from the darkness. And God called the light Day, and the darkness he called Night. And the evening and "
    "the morning were the first day. And God said, Let there be a firmament in the midst of the waters, and let it "
    "divide the waters from the waters. And God made the firmament, and divided the waters which were under the "
    "firmament from the waters which were above the firmament: and it was so. And God called the firmament "
    "Heaven. And the evening and the morning were the second day. And God said, Let the waters under the heaven "
    "be gathered together unto one place, and let the dry land appear: and it was so. And God called the dry land "
    "Earth; and the gathering together of the waters called he Seas: and God saw that it was good.";

constexpr int64_t kContext = 8;   // characters the model sees
constexpr int64_t kEmbed = 16;    // embedding width per character
constexpr int64_t kHidden = 128;  // MLP width

struct Options {
  int64_t steps = 1500;
  int64_t batch = 64;
  double lr = 0.01;
  uint64_t seed = 0;
  std::string optimizer = "adam";
  std::string text_file;
  int64_t log_every = 100;
  int64_t sample_chars = 240;
};

// Byte-level vocabulary of the characters present in the text.
struct Vocab {
  std::vector<char> chars;        // id -> char
  std::array<int64_t, 256> ids{};  // byte -> id
  explicit Vocab(const std::string& text) {
    std::array<bool, 256> seen{};
    for (char c : text) seen[static_cast<unsigned char>(c)] = true;
    for (int b = 0; b < 256; ++b) {
      if (!seen[static_cast<size_t>(b)]) continue;
      ids[static_cast<size_t>(b)] = static_cast<int64_t>(chars.size());
      chars.push_back(static_cast<char>(b));
    }
  }
  int64_t size() const { return static_cast<int64_t>(chars.size()); }
  int64_t id(char c) const { return ids[static_cast<unsigned char>(c)]; }
};

struct Model {
  Tensor emb;  // (V, E)
  Tensor w1;   // (C*E, H)
  Tensor b1;   // (H,)
  Tensor w2;   // (H, V)
  Tensor b2;   // (V,)

  explicit Model(int64_t vocab) {
    autograd::NoGradGuard no_grad;
    emb = randn({vocab, kEmbed});
    w1 = randn({kContext * kEmbed, kHidden}) * (1.0 / std::sqrt(static_cast<double>(kContext * kEmbed)));
    b1 = zeros({kHidden});
    w2 = randn({kHidden, vocab}) * 0.01;  // small logits: the first loss is about ln(V)
    b2 = zeros({vocab});
    for (Tensor* p : params()) p->set_requires_grad(true);
  }
  std::vector<Tensor*> params() { return {&emb, &w1, &b1, &w2, &b2}; }
  // The handles an optimizer updates in place (they share storage with the members).
  nn::NamedTensors named_params() { return {{"emb", emb}, {"w1", w1}, {"b1", b1}, {"w2", w2}, {"b2", b2}}; }
  int64_t num_params() {
    int64_t n = 0;
    for (Tensor* p : params()) n += p->numel();
    return n;
  }

  // ids (B, C) int64 -> logits (B, V)
  Tensor forward(const Tensor& ids) const {
    const int64_t b = ids.size(0);
    Tensor x = embedding(emb, ids).reshape({b, kContext * kEmbed});  // (B, C*E)
    Tensor h = tanh(matmul(x, w1) + b1);                              // (B, H)
    return matmul(h, w2) + b2;                                        // (B, V)
  }
};

// Adam (torch's AdamW with weight decay 0) or plain SGD over the model's parameters.
std::unique_ptr<nn::Optimizer> make_optimizer(Model& model, const Options& opt) {
  if (opt.optimizer == "sgd") return std::make_unique<nn::SGD>(model.named_params(), nn::SGDOptions{.lr = opt.lr});
  nn::AdamWOptions adam;
  adam.lr = opt.lr;
  adam.weight_decay = 0.0;
  return std::make_unique<nn::AdamW>(model.named_params(), adam);
}

// The training examples: (window of kContext chars, next char) at every position of the text.
struct Dataset {
  std::vector<int64_t> tokens;  // (N,)
  int64_t positions() const { return static_cast<int64_t>(tokens.size()) - kContext; }

  // Rows `starts` -> ids (B, C), targets (B,)
  std::pair<Tensor, Tensor> batch(const std::vector<int64_t>& starts) const {
    const int64_t b = static_cast<int64_t>(starts.size());
    std::vector<int64_t> ids(static_cast<size_t>(b * kContext)), targets(static_cast<size_t>(b));
    for (int64_t r = 0; r < b; ++r) {
      const int64_t s = starts[static_cast<size_t>(r)];
      for (int64_t c = 0; c < kContext; ++c) ids[static_cast<size_t>(r * kContext + c)] = tokens[static_cast<size_t>(s + c)];
      targets[static_cast<size_t>(r)] = tokens[static_cast<size_t>(s + kContext)];
    }
    return {from_vector<int64_t>(ids, {b, kContext}), from_vector<int64_t>(targets, {b})};
  }
};

// Mean loss over (up to 4096 evenly spaced) positions of the text, without recording history.
double eval_loss(const Model& model, const Dataset& data) {
  autograd::NoGradGuard no_grad;
  const int64_t n = std::min<int64_t>(data.positions(), 4096);
  std::vector<int64_t> starts(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) starts[static_cast<size_t>(i)] = i * data.positions() / n;
  auto [ids, targets] = data.batch(starts);
  return cross_entropy(model.forward(ids), targets).item<double>();
}

std::string greedy_sample(const Model& model, const Vocab& vocab, const std::string& prompt, int64_t n) {
  autograd::NoGradGuard no_grad;
  std::vector<int64_t> window;  // (C,)
  for (char c : prompt) window.push_back(vocab.id(c));
  std::string out = prompt;
  for (int64_t i = 0; i < n; ++i) {
    Tensor logits = model.forward(from_vector<int64_t>(window, {1, kContext}));  // (1, V)
    const int64_t next = argmax(logits, 1).item<int64_t>();
    out.push_back(vocab.chars[static_cast<size_t>(next)]);
    window.erase(window.begin());
    window.push_back(next);
  }
  return out;
}

int run(const Options& opt) {
  std::string text = kDefaultText;
  if (!opt.text_file.empty()) {
    std::ifstream in(opt.text_file, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "error: cannot read %s\n", opt.text_file.c_str());
      return 2;
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    text = ss.str();
    if (static_cast<int64_t>(text.size()) < kContext + 2) {
      std::fprintf(stderr, "error: %s holds %zu bytes; need at least %lld\n", opt.text_file.c_str(), text.size(),
                   static_cast<long long>(kContext + 2));
      return 2;
    }
  }
  manual_seed(opt.seed);
  std::mt19937_64 rng(opt.seed);
  const Vocab vocab(text);
  Dataset data;
  for (char c : text) data.tokens.push_back(vocab.id(c));

  Model model(vocab.size());
  const std::unique_ptr<nn::Optimizer> optim = make_optimizer(model, opt);
  std::printf("kiln char model: %zu chars, vocab %lld, context %lld, embedding %lld, hidden %lld, %lld parameters\n",
              text.size(), static_cast<long long>(vocab.size()), static_cast<long long>(kContext),
              static_cast<long long>(kEmbed), static_cast<long long>(kHidden),
              static_cast<long long>(model.num_params()));
  std::printf("training: %lld steps, batch %lld, %s lr %g, seed %llu\n", static_cast<long long>(opt.steps),
              static_cast<long long>(opt.batch), opt.optimizer.c_str(), opt.lr,
              static_cast<unsigned long long>(opt.seed));
  const double first_eval = eval_loss(model, data);

  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto t_window = t_start;
  std::uniform_int_distribution<int64_t> pick(0, data.positions() - 1);
  std::vector<int64_t> starts(static_cast<size_t>(opt.batch));
  double window_loss = 0.0, first_train = 0.0, last_train = 0.0;
  int64_t window_steps = 0;
  for (int64_t step = 0; step < opt.steps; ++step) {
    for (int64_t& s : starts) s = pick(rng);
    auto [ids, targets] = data.batch(starts);
    Tensor loss = cross_entropy(model.forward(ids), targets);  // mean over the batch
    loss.backward();
    optim->step();
    optim->zero_grad();
    const double l = loss.item<double>();
    if (step == 0) first_train = l;
    window_loss += l;
    ++window_steps;
    if ((step + 1) % opt.log_every == 0 || step + 1 == opt.steps) {
      const auto now = clock::now();
      const double secs = std::chrono::duration<double>(now - t_window).count();
      last_train = window_loss / static_cast<double>(window_steps);
      std::printf("step %6lld  loss %.4f  tokens/s %.0f\n", static_cast<long long>(step + 1), last_train,
                  static_cast<double>(window_steps * opt.batch) / std::max(secs, 1e-9));
      std::fflush(stdout);
      window_loss = 0.0;
      window_steps = 0;
      t_window = now;
    }
  }
  const double total = std::chrono::duration<double>(clock::now() - t_start).count();
  const double last_eval = eval_loss(model, data);
  std::printf("trained in %.1f s; train loss %.4f (first step) -> %.4f (last logged window)\n", total, first_train,
              last_train);
  std::printf("loss over the text: initial %.4f -> final %.4f\n", first_eval, last_eval);
  if (opt.sample_chars > 0) {
    const std::string sample = greedy_sample(model, vocab, text.substr(0, static_cast<size_t>(kContext)), opt.sample_chars);
    std::printf("greedy sample:\n%s\n", sample.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  CLI::App app{"Trains a character-level MLP (context " + std::to_string(kContext) + ", embedding " + std::to_string(kEmbed) +
               ", hidden " + std::to_string(kHidden) +
               ") with kiln's autograd on the CPU, on Genesis 1 (KJV) or on the text of --text FILE, then prints a greedy sample."};
  app.add_option("--steps", opt.steps, "optimizer steps")->check(CLI::Range(int64_t{1}, int64_t{10000000}))->capture_default_str();
  app.add_option("--batch", opt.batch, "examples per step")->check(CLI::Range(int64_t{1}, int64_t{65536}))->capture_default_str();
  app.add_option("--lr", opt.lr, "learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", opt.seed, "seed of the weights and the batches")->capture_default_str();
  app.add_option("--optim", opt.optimizer, "adam | sgd")->check(CLI::IsMember({"adam", "sgd"}))->capture_default_str();
  app.add_option("--text", opt.text_file, "train on this file instead of Genesis 1")->check(CLI::ExistingFile);
  app.add_option("--log-every", opt.log_every, "print the loss every N steps")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--sample", opt.sample_chars, "characters of the final greedy sample")
      ->check(CLI::Range(int64_t{0}, int64_t{100000}))->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return run(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kiln error: %s\n", e.what());
    return 1;
  }
}
