// fully_shard: FSDP2's model of sharding over a ProcessGroup. Each unit (a module, typically a decoder
// layer, and the root above them) keeps 1/world of the rows of every parameter and buffer between uses,
// gathers them with one all_gather before its forward (prefetched) and again for its backward, and
// reduce-scatters the gradients of its trainable parameters as soon as backward produced them.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/hook_handle.h"
#include "dist/fsdp_layout.h"
#include "dist/process_group.h"
#include "nn/llama.h"
#include "nn/module.h"

namespace kiln::dist {

struct FullyShardOptions {
  // Free a unit's gathered tensors after its forward (gather again for backward). The root unit keeps
  // them until its backward ends (its outputs feed the loss right away), as FSDP2 does.
  bool reshard_after_forward = true;
  // Units whose all_gather may be issued ahead of the one computing: the next in module order during
  // forward, the previous during backward. 0: each unit gathers when its own forward or backward starts.
  int prefetch = 1;
  // Gradients are reduced in this dtype (f32 or bf16), then cast to the parameter's dtype.
  DType reduce_dtype = DType::f32;
  // Reduced gradients are SUMS over ranks divided by this. 1 suits a loss already normalised by the global
  // token count (train::Trainer divides by the step's loss tokens over all ranks); a loss averaged per rank
  // wants the world size here.
  double gradient_divide_factor = 1.0;
  // Tensors with fewer elements (and 0-d ones) stay whole on every rank: never gathered; a trainable one's
  // gradient joins one flat all_reduce per unit instead of the reduce_scatter. Norm weights, NF4 codebooks
  // and tiny adapters cost less replicated than padded to the world size. 0: shard everything.
  int64_t replicate_below = 1024;
  // false: wait for every gradient reduction as soon as it is issued (to measure what overlap hides).
  bool async_reduce = true;
};

class FsdpSchedule;

// One fully_shard call: the module's tensors (those of sub-units excluded), its shard buffer and hooks.
// Owned by the module's hooks (it lives as long as the module); fully_shard returns a handle.
class FsdpUnit : public std::enable_shared_from_this<FsdpUnit> {
 public:
  enum class State { sharded, gathering, gathered };

  ~FsdpUnit();
  FsdpUnit(const FsdpUnit&) = delete;
  FsdpUnit& operator=(const FsdpUnit&) = delete;

  nn::Module& module() const { return *module_; }
  ProcessGroup& group() const { return *group_; }
  const FullyShardOptions& options() const { return options_; }
  const std::vector<FsdpTensor>& tensors() const { return tensors_; }
  const FsdpSizes& sizes() const { return sizes_; }
  State state() const { return state_; }
  bool is_root() const;
  // The units this one's schedule runs (module order, the root first); a unit without a root runs alone.
  std::vector<std::shared_ptr<FsdpUnit>> schedule_units() const;
  // This module's path below the root's module ("" for the root or a unit alone).
  const std::string& path() const { return path_; }

  // The knobs that may change between steps, for every unit of this schedule (benchmarks compare them).
  void set_overlap(int prefetch, bool async_reduce);

  // Gathers the full tensors now (waits) / frees them (every tensor points at its shard again).
  void unshard();
  void reshard();
  // Issues the all_gather without waiting (prefetch); unshard() completes it.
  void issue_gather();
  // A collective: every rank gets fresh full copies of the trainable tensors (module order of tensors()).
  std::vector<Tensor> gather_trainable();

  // Bytes this rank holds: the flat shard buffer plus the replicated tensors.
  size_t local_bytes() const;
  // Bytes of every tensor at full size (what one unsharded rank would hold).
  size_t full_bytes() const;

 private:
  friend class FsdpSchedule;
  friend std::shared_ptr<FsdpUnit> fully_shard(nn::Module&, std::shared_ptr<ProcessGroup>, const FullyShardOptions&);
  FsdpUnit(nn::Module& module, std::shared_ptr<ProcessGroup> group, const FullyShardOptions& options);
  void shard_tensors();
  void attach_hooks();
  // The hooks' work.
  void pre_forward(nn::Module::ForwardCall& call);
  void post_forward(std::vector<Tensor>& outputs);
  void pre_backward();
  void post_backward();
  void on_gradient(size_t index, const Tensor& leaf);
  // Gradients: moves .grad of the trainable tensors into their stash (before autograd writes new ones).
  void stash_gradients();
  void issue_reduction();
  void finish_reduction();  // waits; .grad = stash + reduced shard

  nn::Module* module_;
  std::shared_ptr<ProcessGroup> group_;
  FullyShardOptions options_;
  std::vector<FsdpTensor> tensors_;
  FsdpSizes sizes_;
  Tensor flat_;  // u8 (shard_bytes): this rank's shards of every sharded tensor
  State state_ = State::sharded;
  Tensor gathered_;  // u8 (world * shard_bytes) while gathering
  Work gather_work_;
  std::shared_ptr<FsdpSchedule> schedule_;
  size_t index_ = 0;  // in the schedule
  std::string path_;
  std::vector<HookHandle> handles_;
  // The reduction of this backward's gradients.
  struct Reduction {
    Tensor scatter_in;   // (world * grad_numel) reduce dtype
    Tensor scatter_out;  // (grad_numel)
    Tensor replicated;   // (replicated_grad_numel), reduced in place
    Work scatter_work, replicated_work;
    std::vector<bool> arrived;  // by tensor index
    size_t count = 0;
    bool issued = false;
  };
  std::unique_ptr<Reduction> reduction_;
  size_t trainable_count_ = 0;
};

// Shards `module` over `group` as one unit. Units already applied below it (bottom-up, as FSDP2 is used:
// each decoder layer, then the root) keep their tensors and join its schedule. Shard the root too: a
// unit without one above it is a root itself (gathered from its forward to the end of its backward, no
// prefetch). Every rank must call it
// with the same model; the tensors must be on the group's device (CPU for local/gloo, CUDA for nccl or
// local on a GPU). A second fully_shard of one module is an error.
std::shared_ptr<FsdpUnit> fully_shard(nn::Module& module, std::shared_ptr<ProcessGroup> group,
                                      const FullyShardOptions& options = {});
// fully_shard on each decoder layer, then on the whole model (the root: embeddings, final norm, lm_head).
// Call the model through operator() (the hooks' entry), as train::llama_loss does.
std::shared_ptr<FsdpUnit> shard_llama(nn::Llama& model, std::shared_ptr<ProcessGroup> group,
                                      const FullyShardOptions& options = {});
// The unit applied to `module` itself (null if none).
std::shared_ptr<FsdpUnit> find_unit(const nn::Module& module);

// clip_grad_norm_ over gradients sharded by fully_shard: the squared norms of sharded gradients are
// summed over ranks (one all_reduce), replicated ones counted once; every rank scales by the same
// coefficient. Parameters fully_shard does not manage count as replicated. Returns the global norm.
double clip_grad_norm_sharded(const std::vector<std::shared_ptr<FsdpUnit>>& units, const nn::NamedTensors& params,
                              double max_norm);

}  // namespace kiln::dist
