// `kiln finetune` over several processes: the world from the launcher's variables (gloo on the CPU, NCCL
// with one GPU per rank), the settings check, `--nproc` re-launching this program, and `kiln launch`.
#include "examples/kiln/distributed.h"

#include <cstdio>
#include <filesystem>

#include "core/cuda/runtime.h"
#include "dist/init.h"
#include "dist/launch.h"
#include "dist/local.h"
#include "dist/store.h"
#include "examples/kiln/app.h"

namespace kiln::app {

namespace fs = std::filesystem;

namespace {

std::vector<std::string> g_command_line;

std::string self_exe() { return fs::read_symlink("/proc/self/exe").string(); }

}  // namespace

void set_command_line(int argc, char** argv) { g_command_line.assign(argv, argv + argc); }
const std::vector<std::string>& command_line() { return g_command_line; }

void check_same_settings(dist::ProcessGroup& group, const FinetuneConfig& config) {
  auto store = group.store();
  KILN_CHECK(store != nullptr, "finetune", "the {} process group has no store to compare settings through", group.backend());
  for (const auto& [name, value] : config.settings())
    dist::check_same(*store, group.rank(), group.size(), name, value, group.timeout());
}

RunWorld join_world(const FinetuneConfig& c, bool shard) {
  const dist::Environment env = dist::read_environment();
  RunWorld w;
  if (env.world_size == 1) {
    w.device = resolve_device(c.device);
    if (shard) w.group = dist::make_local_groups(1)[0];  // fully_shard over a world of one
    return w;
  }
  // One GPU per rank: cuda (or auto with GPUs) means cuda:<local rank>; an explicit index only when this
  // node runs one rank.
  Device device = kCPU;
  const bool gpus = cuda::is_available();
  if (c.device == "cuda" || (c.device == "auto" && gpus)) {
    KILN_CHECK(gpus, "finetune", "--device cuda: no CUDA device is visible");
    device = Device(DeviceType::cuda, env.local_rank % cuda::device_count());
  } else if (c.device != "auto" && c.device != "cpu") {
    device = resolve_device(c.device);
    KILN_CHECK(!device.is_cuda() || env.local_world_size == 1, "finetune",
               "--device {} with {} ranks on this node: give --device cuda (rank r takes cuda:r)", c.device,
               env.local_world_size);
  }
  dist::InitOptions o;
  o.device = device;
  o.backend = device.is_cuda() ? "nccl" : "gloo";
  o.same_settings = {{"shard", shard ? "on" : "off"}};
  dist::World world = dist::init(o);
  w.group = world.group;
  w.device = world.device;
  check_same_settings(*w.group, c);
  return w;
}

int relaunch_ranks(int nproc, const std::vector<std::string>& args) {
  KILN_CHECK(dist::read_environment().world_size == 1, "finetune",
             "--nproc starts the ranks itself; under a launcher (kiln launch, torchrun, srun, mpirun) leave it out");
  std::vector<std::string> argv{self_exe()};
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--nproc") {
      ++i;  // and its value
      continue;
    }
    if (args[i].rfind("--nproc=", 0) == 0) continue;
    argv.push_back(args[i]);
  }
  dist::LaunchOptions o;
  o.nproc = nproc;
  return dist::launch(o, argv);
}

namespace {

struct LaunchSettings {
  dist::LaunchOptions options;
  int grace_s = 10;
};

void add_launch_options(CLI::App& cmd, LaunchSettings& s) {
  cmd.add_option("--nproc", s.options.nproc, "processes on this node")->check(CLI::PositiveNumber);
  cmd.add_option("--nnodes", s.options.nnodes, "nodes in the job")->check(CLI::PositiveNumber);
  cmd.add_option("--node-rank", s.options.node_rank, "this node's index in [0, nnodes)")->check(CLI::NonNegativeNumber);
  cmd.add_option("--master-addr", s.options.master_addr, "address of rank 0's node");
  cmd.add_option("--master-port", s.options.master_port,
                 "port of rank 0's store (default: a free port on one node, 29500 across nodes)")
      ->check(CLI::Range(0, 65535));
  cmd.add_option("--grace", s.grace_s, "seconds the other ranks get to exit after one failed, before SIGKILL")
      ->check(CLI::NonNegativeNumber);
}

}  // namespace

void add_launch_command(CLI::App& app) {
  // Listed for --help; main() runs `kiln launch` itself through run_launch (the "--" must reach it).
  auto* cmd = app.add_subcommand("launch", "start N ranks of a program for dist::init, like torchrun "
                                           "(kiln launch --nproc N -- kiln finetune ...)");
  static LaunchSettings help_only;
  add_launch_options(*cmd, help_only);
  cmd->allow_extras();
}

int run_launch(const std::vector<std::string>& args) {
  std::vector<std::string> ours, command;
  bool rest = false;
  for (const std::string& a : args) {
    if (!rest && a == "--") rest = true;
    else (rest ? command : ours).push_back(a);
  }
  LaunchSettings s;
  CLI::App app("kiln launch: start N ranks of a program for dist::init (like torchrun)\n"
               "usage: kiln launch --nproc N [options] -- program args...", "kiln launch");
  add_launch_options(app, s);
  app.prefix_command();  // without "--": the first positional starts the command
  try {
    std::vector<std::string> reversed(ours.rbegin(), ours.rend());
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (!rest) {
    command = app.remaining();
  } else if (!app.remaining().empty()) {
    std::fprintf(stderr, "kiln launch: unexpected argument '%s' before '--'\n", app.remaining()[0].c_str());
    return 2;
  }
  if (command.empty()) {
    std::fprintf(stderr, "kiln launch: expected a program to run (kiln launch --nproc N -- kiln finetune ...)\n");
    return 2;
  }
  if (command[0] == "kiln") command[0] = self_exe();  // this kiln, whatever PATH holds
  s.options.grace = std::chrono::seconds(s.grace_s);
  try {
    return dist::launch(s.options, command);
  } catch (const kiln::Error& e) {
    std::fprintf(stderr, "kiln launch: %s\n", e.what());
    return 2;
  }
}

}  // namespace kiln::app
