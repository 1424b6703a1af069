// The kernels one QLoRA training step launches (forward, checkpoint recomputes, backward, gradient
// clipping, AdamW), counted op by op at the dispatch point: every non-view op is one kernel on the GPU.
// A small Llama (hidden 256, MLP 512, 4 query / 2 KV heads, vocabulary 512) in bf16 on the CPU with an
// NF4 base and LoRA r=16 on every linear layer, so the counts need no GPU.
// Usage: kernel_census [layers (2)] [tokens (64)] [--checkpointing] [--compile] [--ops] [--shapes OP]
// (--compile: the decoder layers compiled as `kiln finetune --compile` does, each fused group one
// kernel; --ops: a row per op; --shapes OP: a row per kind of call of OP (`copy`, `add`, ...), by its
// inputs' shapes, the first input's strides, and dtypes)
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "bench/qlora_model.h"
#include "compile/compile.h"
#include "core/dispatch.h"
#include "core/ops.h"

using namespace kiln;

namespace {

// Kernels by op name, in-place ops (run_into) included.
struct Census : DispatchHandler {
  std::string shapes_of;  // the op whose calls are told apart by shape ("": none)
  std::map<std::string, int> calls, shapes;
  // `into`: the existing output of an in-place op (nullptr: a new one).
  void count(const PrimitivePtr& op, const std::vector<Tensor>& inputs, const Tensor* into) {
    ++calls[op->name()];
    if (op->name() != shapes_of || inputs.empty()) return;
    std::string what = into ? "into " : "new";
    if (into) what += dtype_name(into->dtype());
    for (const Tensor& in : inputs) what.append(" ").append(shape_str(in.shape()));
    what.append(" strides ").append(shape_str(inputs[0].strides())).append(" ").append(dtype_name(inputs[0].dtype()));
    ++shapes[what];
  }
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (!op->is_view()) count(op, inputs, nullptr);
    return dispatch_next(op, inputs);
  }
  void run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    count(op, inputs, outputs.empty() ? nullptr : &outputs[0]);
    dispatch_next_into(op, inputs, outputs);
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  bool checkpointing = false, compiled = false, ops = false;
  std::string shapes_of;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--checkpointing") checkpointing = true;
    else if (a == "--compile") compiled = true;
    else if (a == "--ops") ops = true;
    else if (a == "--shapes" && i + 1 < argc) shapes_of = argv[++i];
    else pos.push_back(a);
  }
  const int64_t layers = pos.size() > 0 ? std::atoll(pos[0].c_str()) : 2;
  const int64_t tokens = pos.size() > 1 ? std::atoll(pos[1].c_str()) : 64;
  if (layers < 1 || tokens < 1) {
    std::fprintf(stderr, "usage: %s [layers] [tokens] [--checkpointing] [--compile] [--ops] [--shapes OP]\n", argv[0]);
    return 2;
  }
  nn::LlamaConfig c = nn::LlamaConfig::named("llama3.1-8b");
  c.num_hidden_layers = layers;
  c.vocab_size = 512;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  auto model = bench::qlora_llama(c, kCPU);
  model->set_checkpoint_activations(checkpointing);
  if (compiled) {
    compile::CompileOptions co;
    co.dynamic_dims = {{0, 1}};  // as the Trainer's seam: the sequence length symbolic from the start
    compile::compile_llama_layers(*model, co);
  }
  nn::AdamW opt(model->named_trainable_parameters());
  const Tensor ids = randint(0, c.vocab_size, {1, tokens}, DType::i64);      // (1, T)
  const Tensor targets = randint(0, c.vocab_size, {1, tokens}, DType::i64);  // (1, T)
  auto step = [&] { bench::training_step(*model, opt, ids, targets); };
  step();  // the optimizer's state, tables built once
  Census census;
  census.shapes_of = shapes_of;
  compile::reset_stats();
  {
    HandlerScope scope(&census);
    step();
  }
  if (compiled) census.calls["(fused groups)"] = static_cast<int>(compile::stats().group_launches);
  int total = 0;
  for (const auto& [name, n] : census.calls) total += n;
  std::printf("%lld decoder layers, %lld tokens, checkpointing %s%s: %d kernels per training step (%.1f per layer)\n",
              static_cast<long long>(layers), static_cast<long long>(tokens), checkpointing ? "on" : "off",
              compiled ? ", layers compiled" : "", total,
              static_cast<double>(total) / static_cast<double>(layers));
  if (ops) {
    std::printf("| op | kernels |\n|---|---|\n");
    for (const auto& [name, n] : census.calls) std::printf("| %s | %d |\n", name.c_str(), n);
  }
  if (!shapes_of.empty()) {
    std::printf("| %s (into: to an existing tensor of that dtype), input shapes, strides, dtype | kernels |\n|---|---|\n",
                shapes_of.c_str());
    for (const auto& [what, n] : census.shapes) std::printf("| %s | %d |\n", what.c_str(), n);
  }
  return 0;
}
