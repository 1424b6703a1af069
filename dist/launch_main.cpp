// kiln-run: the local launcher. `kiln-run --nproc N [--nnodes M --node-rank R --master-addr A
// --master-port P] -- program args...` starts N ranks of the program with the variables dist::init
// reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "core/error.h"
#include "dist/launch.h"

int main(int argc, char** argv) {
  // Everything after the first "--" is the program and its arguments.
  std::vector<std::string> ours, command;
  bool rest = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (!rest && a == "--") rest = true;
    else (rest ? command : ours).push_back(a);
  }
  kiln::dist::LaunchOptions o;
  CLI::App app("kiln-run: start N ranks of a program for dist::init (like torchrun)\n"
               "usage: kiln-run --nproc N [options] -- program args...", "kiln-run");
  app.add_option("--nproc", o.nproc, "processes on this node")->check(CLI::PositiveNumber);
  app.add_option("--nnodes", o.nnodes, "nodes in the job")->check(CLI::PositiveNumber);
  app.add_option("--node-rank", o.node_rank, "this node's index in [0, nnodes)")->check(CLI::NonNegativeNumber);
  app.add_option("--master-addr", o.master_addr, "address of rank 0's node");
  app.add_option("--master-port", o.master_port, "port of rank 0's store (default: a free port on one node, 29500 across nodes)")
      ->check(CLI::Range(0, 65535));
  int grace_s = 10;
  app.add_option("--grace", grace_s, "seconds the other ranks get to exit after one failed, before SIGKILL")
      ->check(CLI::NonNegativeNumber);
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
    std::fprintf(stderr, "kiln-run: unexpected argument '%s' before '--'\n", app.remaining()[0].c_str());
    return 2;
  }
  if (command.empty()) {
    std::fprintf(stderr, "kiln-run: expected a program to run (kiln-run --nproc N -- program args...)\n");
    return 2;
  }
  o.grace = std::chrono::seconds(grace_s);
  try {
    return kiln::dist::launch(o, command);
  } catch (const kiln::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
