// `kiln`: fine-tune (finetune, on one or several processes: launch), evaluate (eval), sample from
// (generate), export merged (export) and quantise (quantize) Llama models. Errors are reported as one
// line and exit code 1; nothing aborts.
#include <cstdio>
#include <string>

#include "examples/kiln/app.h"
#include "examples/kiln/distributed.h"
#include "examples/kiln/export.h"
#include "examples/kiln/memory_check.h"
#include "examples/kiln/quantize.h"

int main(int argc, char** argv) {
  kiln::app::set_command_line(argc, argv);
  // `kiln launch ... -- program args`: parsed apart, so that the program's own flags pass untouched.
  if (argc > 1 && std::string(argv[1]) == "launch") return kiln::app::run_launch({argv + 2, argv + argc});
  CLI::App app{"kiln: QLoRA/LoRA fine-tuning of Llama models (kiln finetune with no arguments runs the default job)"};
  app.require_subcommand(1);
  kiln::app::add_finetune_command(app);
  kiln::app::add_eval_command(app);
  kiln::app::add_generate_command(app);
  kiln::app::add_export_command(app);
  kiln::app::add_quantize_command(app);
  kiln::app::add_launch_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Error& e) {  // bad flags (usage printed), or an exit code such as 130 after Ctrl-C
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kiln: %s\n", e.what());
    if (std::string(e.what()).find("[cuda alloc] out of memory") != std::string::npos)
      std::fprintf(stderr, "kiln: %s\n", kiln::app::gpu_memory_advice().c_str());
    return 1;
  }
  return 0;
}
