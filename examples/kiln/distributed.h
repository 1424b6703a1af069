// Several processes for `kiln finetune`: joining the job a launcher (kiln launch, torchrun, Slurm, mpirun)
// started, the start-up check that every rank runs the same settings, `--nproc N` re-launching kiln
// itself, and the `kiln launch` subcommand.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "core/device.h"
#include "dist/process_group.h"
#include "examples/kiln/finetune_config.h"

namespace kiln::app {

// The world a run trains in; no group for a single process.
struct RunWorld {
  std::shared_ptr<dist::ProcessGroup> group;
  Device device;
  int rank() const { return group ? group->rank() : 0; }
  int size() const { return group ? group->size() : 1; }
};

// The launcher's variables (dist::read_environment): a world of one without them. Several ranks: the
// backend follows the device (cpu: gloo, cuda: nccl with cuda:<local rank>), and every rank's settings are
// checked against rank 0's. A world of one with `shard` gets a local group of one.
RunWorld join_world(const FinetuneConfig& config, bool shard);

// Each setting of `config` (the names of config.toml) must be the same on every rank; the first that
// differs fails every rank: "[check_same] setting 'lr' differs across ranks: rank 1 has '0.1', rank 0 has ...".
void check_same_settings(dist::ProcessGroup& group, const FinetuneConfig& config);

// `kiln finetune --nproc N`: runs this program again as N ranks on this machine with the same arguments
// minus --nproc (dist::launch); returns the launcher's status.
int relaunch_ranks(int nproc, const std::vector<std::string>& args);

// The command line main() received, for relaunch_ranks.
void set_command_line(int argc, char** argv);
const std::vector<std::string>& command_line();

// `kiln launch --nproc N [--nnodes M --node-rank R --master-addr A --master-port P] -- program args...`
// (program "kiln" is this kiln). main() hands it the arguments after "launch" (CLI11 would eat "--").
void add_launch_command(CLI::App& app);
int run_launch(const std::vector<std::string>& args);

}  // namespace kiln::app
