// Compiling modules: a forward wrapper that runs the module's forward chain compiled, the call key
// (its non-tensor arguments) part of the cache key; Llama decoder layers share plans. Compiling a
// chunked head's loss function.
#include "compile/compile.h"
#include "core/registry.h"
#include "nn/llama.h"

namespace kiln::compile {

HookHandle compile_module(nn::Module& module, CompileOptions options) {
  if (options.name == "fn") options.name = module.type_name();
  const CompiledFunction compiled = compile(nullptr, std::move(options));
  return module.register_forward_wrapper(
      [compiled](nn::Module&, const nn::Module::ForwardCall& call, const nn::Module::ForwardFn& next) {
        return compiled.run(next, call.inputs, call.key);
      });
}

std::vector<HookHandle> compile_llama_layers(nn::Llama& model, CompileOptions options) {
  auto& layers = model.model().child_as<nn::ModuleList>("layers");
  std::vector<HookHandle> handles;
  for (int64_t i = 0; i < layers.size(); ++i) handles.push_back(compile_module(layers.at<nn::LlamaDecoderLayer>(i), options));
  return handles;
}

namespace {

// A Llama's decoder layers, the sequence length symbolic from the start unless the options say otherwise.
void compile_llama(nn::Llama& llama, CompileOptions o) {
  if (o.dynamic_dims.empty()) o.dynamic_dims = {{0, 1}};  // x (B, T, hidden)
  (void)compile_llama_layers(llama, o);  // the wrappers stay for the model's lifetime
}

}  // namespace

train::CompileFn trainer_compile(CompileOptions options) {
  return [options](nn::Module& model, train::BatchLossFn loss) {
    auto* llama = dynamic_cast<nn::Llama*>(&model);
    KILN_CHECK(llama != nullptr, "compile", "trainer_compile compiles nn::Llama models, given a {}", model.type_name());
    compile_llama(*llama, options);
    return loss;
  };
}

// Module::compile(): a Llama's decoder layers (the sequence length symbolic from the start), any other
// module's whole forward. The wrappers stay for the module's lifetime.
KILN_REGISTER(compile_module_compiler) {
  nn::Module::set_module_compiler([](nn::Module& m) {
    if (auto* llama = dynamic_cast<nn::Llama*>(&m)) compile_llama(*llama, {});
    else (void)compile_module(m);
  });
}

nn::LossFn compile_loss(nn::LossFn loss, CompileOptions options) {
  KILN_CHECK(loss != nullptr, "compile", "compile_loss needs a loss function, found none");
  if (options.name == "fn") options.name = "loss";
  if (options.dynamic_dims.empty()) options.dynamic_dims = {{0, 0}, {1, 0}};  // logits (n, V), targets (n)
  const CompiledFunction compiled = compile(
      [loss](const std::vector<Tensor>& in) { return std::vector<Tensor>{loss(in[0], in[1])}; }, std::move(options));
  return [compiled](const Tensor& logits, const Tensor& targets) { return compiled({logits, targets})[0]; };
}

}  // namespace kiln::compile
