// Llama 3.1 8B (random bf16 weights, the real config) with LoRA r=16 on every linear layer, one
// forward+backward at batch 1 x 4096 tokens on one GPU: step time, tokens/s and peak memory, with
// and without activation checkpointing. Optional: --base nf4 (QLoRA base), --layers N, --seq T.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "autograd/grad_mode.h"
#include "bench/cuda_timing.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"

using namespace kiln;

namespace {

struct Args {
  int64_t layers = 32;
  int64_t seq = 4096;
  int iters = 5;
  std::string base = "bf16";  // or nf4
  std::string head = "chunked";  // or naive
};

double gib(size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layers") a.layers = std::stoll(v);
    else if (k == "--seq") a.seq = std::stoll(v);
    else if (k == "--iters") a.iters = std::stoi(v);
    else if (k == "--base") a.base = v;
    else if (k == "--head") a.head = v;
    else {
      std::fprintf(stderr, "usage: %s [--layers N] [--seq T] [--iters N] [--base bf16|nf4] [--head chunked|naive]\n", argv[0]);
      return 2;
    }
  }
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  try {
    nn::LlamaConfig cfg = nn::LlamaConfig::named("llama3.1-8b");
    cfg.num_hidden_layers = a.layers;
    nn::LlamaOptions o;
    o.dtype = DType::bf16;
    o.device = Device(DeviceType::cuda, 0);
    o.seed = 1;
    if (a.base == "nf4") o.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
    const auto t0 = std::chrono::steady_clock::now();
    auto model = std::make_shared<nn::Llama>(cfg, o);
    cuda::synchronize();
    const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    nn::LoraConfig lora;
    lora.r = 16;
    lora.alpha = 32;
    nn::apply_lora(*model, lora, 2);
    model->train();
    const int64_t trainable = model->num_parameters(true);
    Generator gen(7);
    Tensor ids = randint(0, cfg.vocab_size, {1, a.seq}, DType::i64, o.device, &gen);
    Tensor targets = randint(0, cfg.vocab_size, {1, a.seq}, DType::i64, o.device, &gen);
    const size_t weights_bytes = cuda::memory_stats().allocated;
    std::printf("Llama 3.1 8B config, %lld layers, base %s, LoRA r=16 on all linear layers (%lld trainable params), "
                "batch 1 x %lld tokens, head %s; model built in %.1f s, %.2f GiB resident\n",
                static_cast<long long>(a.layers), a.base.c_str(), static_cast<long long>(trainable),
                static_cast<long long>(a.seq), a.head.c_str(), build_s, gib(weights_bytes));
    std::printf("| checkpointing | step ms | tokens/s | peak GiB | peak - weights GiB |\n|---|---|---|---|---|\n");
    for (bool ck : {true, false}) {
      model->set_checkpoint_activations(ck);
      auto step = [&] {
        Tensor h = model->forward(ids);
        Tensor loss = a.head == "naive" ? model->loss(h, targets) : model->chunked_loss(h, targets);
        loss.backward();
        model->zero_grad();
      };
      step();  // warm-up: plans, allocator
      cuda::synchronize();
      cuda::reset_peak_memory_stats();
      const double ms = bench::time_ms(step, a.iters, 1);
      const cuda::MemoryStats st = cuda::memory_stats();
      std::printf("| %s | %.1f | %.0f | %.2f | %.2f |\n", ck ? "on" : "off", ms, static_cast<double>(a.seq) * 1000.0 / ms,
                  gib(st.peak_allocated), gib(st.peak_allocated - weights_bytes));
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 1;
  }
  return 0;
}
