// The one way a library plugs into core: kernel families (CPU, CUDA, quant), device allocators and
// autograd's recorder each declare a static KILN_REGISTER block in the file that provides them.
// Blocks only enqueue themselves at static initialisation; they run, once and in link order, the
// first time dispatch, an allocator or the recorder is needed (so no CUDA call happens before main).
// Libraries are linked whole (Meson link_whole, kiln.pc), so no registration is dropped by the linker.
#pragma once

namespace kiln {

struct Registration {
  Registration(const char* what, void (*fn)());
};

// Runs every registration not yet run; cheap after the first call. Thread-safe.
void run_registrations();

}  // namespace kiln

#define KILN_REGISTER_CONCAT2(a, b) a##b
#define KILN_REGISTER_CONCAT(a, b) KILN_REGISTER_CONCAT2(a, b)
// KILN_REGISTER(cpu_copy_kernels) { register_kernel<prim::Copy>(DeviceType::cpu, &copy_kernel); ... }
#define KILN_REGISTER(name)                                                                                    \
  static void KILN_REGISTER_CONCAT(kiln_register_, name)();                                                    \
  [[maybe_unused]] static const ::kiln::Registration KILN_REGISTER_CONCAT(kiln_registration_, name)(          \
      #name, &KILN_REGISTER_CONCAT(kiln_register_, name));                                                     \
  static void KILN_REGISTER_CONCAT(kiln_register_, name)()
