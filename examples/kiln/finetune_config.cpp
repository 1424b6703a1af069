// One table of fields drives the flags, the TOML file (same names, '-' in flags for '_'), the
// written config.toml, and which flags override the file.
#include "examples/kiln/finetune_config.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <toml++/toml.h>
#include <variant>

#include "core/error.h"
#include "core/file_io.h"
#include "data/default_corpus.h"
#include "data/utf8.h"

namespace kiln::app {

namespace {

using C = FinetuneConfig;
using Member = std::variant<std::string C::*, int64_t C::*, uint64_t C::*, double C::*, bool C::*,
                            std::vector<std::string> C::*>;
struct Field {
  const char* name;
  const char* help;
  Member member;
  bool in_fingerprint;
};

const std::vector<Field>& fields() {
  static const std::vector<Field> f{
      {"model", "Hugging Face model folder (config.json + safetensors); without --model and --config: kiln's default "
                "base (a tiny Llama pretrained on the KJV, data/default/base)", &C::model_dir, true},
      {"config", "named config (tiny, llama3.1-8b, llama3.1-70b) or config.json for a random-weight model", &C::config, true},
      {"random_init", "random weights for --config (required with it)", &C::random_init, true},
      {"tokenizer", "tokenizer.json or a folder holding one", &C::tokenizer, true},
      {"base", "nf4 (QLoRA) or bf16 (LoRA over the model's dtype)", &C::base, true},
      {"full", "train every parameter (no LoRA; needs --base bf16); the result is a model folder, output/model", &C::full, true},
      {"dtype", "auto | f32 | bf16 | f16 (activations and unquantised weights)", &C::dtype, false},
      {"device", "auto | cpu | cuda | cuda:N", &C::device, false},
      {"lora_r", "LoRA rank", &C::lora_r, true},
      {"lora_alpha", "LoRA alpha", &C::lora_alpha, true},
      {"lora_dropout", "LoRA dropout", &C::lora_dropout, true},
      {"rslora", "rank-stabilised scaling alpha/sqrt(r)", &C::rslora, true},
      {"target_modules", "linear layers to adapt", &C::target_modules, true},
      {"data", "training text/JSONL file or folder (default: The Devil's Dictionary, third_party/corpus/devil.txt)", &C::data, true},
      {"text_split", "plain text documents: auto | file | blank_lines | separator", &C::text_split, true},
      {"eval_fraction", "share of documents held out for eval loss", &C::eval_fraction, true},
      {"seq_len", "tokens per sequence", &C::seq_len, true},
      {"batch_size", "sequences per micro-batch", &C::batch_size, true},
      {"grad_accum", "micro-batches per optimizer step", &C::grad_accum, true},
      {"steps", "optimizer steps (0: use --epochs)", &C::steps, false},
      {"epochs", "passes over the training data when --steps is 0", &C::epochs, false},
      {"lr", "peak learning rate", &C::lr, true},
      {"schedule", "constant | linear | cosine", &C::schedule, true},
      {"warmup", "warmup steps", &C::warmup, true},
      {"weight_decay", "AdamW decoupled weight decay", &C::weight_decay, true},
      {"clip", "clip gradients to this global L2 norm (0: off)", &C::clip, true},
      {"skip_nonfinite_steps", "skip (and count) steps whose loss or gradients are NaN/inf instead of stopping", &C::skip_nonfinite_steps, false},
      {"seed", "seed of weights, adapters, data order and dropout", &C::seed, true},
      {"checkpointing", "activation checkpointing of every decoder block (no memory plan)", &C::checkpointing, false},
      {"offload", "with --checkpointing on a GPU: each block's input waits in pinned host memory, its copies "
                  "overlapped with compute", &C::offload, false},
      {"mlp_chunk", "long sequences: each MLP runs on at most this many tokens at a time, each chunk "
                    "checkpointed (0: off)", &C::mlp_chunk, false},
      {"segment_layers", "with --checkpointing, very long sequences: the blocks in segments of this many, each keeping "
                         "only its first block's input (offloaded with --offload) and running its forward again in "
                         "backward, two more forwards per block (0: off)", &C::segment_layers, false},
      {"memory_budget", "GiB a step may use at its peak: kiln plans which blocks to checkpoint and the loss chunk "
                        "(0: the device's free memory less a margin; default: that plan unless --checkpointing, "
                        "several ranks or --chunked-head false)", &C::memory_budget, false},
      {"host_memory_budget", "GiB of pinned host memory a GPU's memory plan may offload checkpointed blocks to "
                             "(0: half of the host's free memory)", &C::host_memory_budget, false},
      {"chunked_head", "chunked linear+cross-entropy head (never the full logits)", &C::chunked_head, false},
      {"shard", "with several ranks: shard the model over them (fully_shard) instead of replicating it", &C::shard, false},
      {"compile", "compile each decoder layer, forward and backward, with the JIT fuser (compile/)", &C::compile, false},
      {"eval_every", "eval loss every N steps (0: off)", &C::eval_every, false},
      {"eval_batches", "batches per eval", &C::eval_batches, false},
      {"save_every", "checkpoint every N steps (0: only at the end and on Ctrl-C)", &C::save_every, false},
      {"log_every", "progress line and metrics every N steps", &C::log_every, false},
      {"output", "folder receiving everything the run writes", &C::output, false},
      {"resume", "continue from the latest checkpoint in --output", &C::resume, false},
      {"sample_prompt", "prompt of the sample generated at the end", &C::sample_prompt, false},
      {"sample_tokens", "tokens of the final sample (0: none)", &C::sample_tokens, false},
  };
  return f;
}

std::string flag_name(const char* name) {
  std::string s = std::string("--") + name;
  for (char& ch : s)
    if (ch == '_') ch = '-';
  return s;
}

// toml++ 3.3 (Debian 12's) mishandles several kinds of malformed input (found by tests/fuzz; braces and
// unterminated strings are refused below too): it asserts that a table header's key
// starts with a key character or a quote ("[ = 1" or a lone "[" abort a build with assertions; a clang
// release build assumes it: undefined behaviour), and its test for non-ASCII whitespace reaches
// __builtin_unreachable for most non-ASCII characters where whitespace may stand. Neither can be part of
// kiln's settings (key = value lines of strings, numbers, booleans and arrays of strings), so this scan,
// which steps over strings and comments as TOML does, refuses both with file:line before toml++ reads the file.
// Non-ASCII text stays allowed in strings and comments, but toml++ never sees it where its whitespace test
// could run on it (a value it reads as bare text up to a quote, `x = 20a="n\uFEEF"`, or a line-ending
// backslash in a multi-line string): the scan returns the text toml++ parses, in which every non-ASCII
// character of a "basic" string is a \u or \U escape (the same string) and of a comment '?'. A 'literal'
// string cannot hold escapes: its bytes go in only after the text with them as 'x', ASCII only, parsed.
struct TomlText {
  std::string parsed;     // what toml::parse reads: basic strings escaped, literal strings as they are
  std::string structure;  // the same with the literal strings' non-ASCII bytes as 'x': ASCII only
};

TomlText check_toml_input(std::string_view text, const std::string& path) {
  TomlText out;
  out.parsed.reserve(text.size());
  const auto put = [&out](std::string_view both) {
    out.parsed += both;
    out.structure += both;
  };
  auto key_start = [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
           c == '"' || c == '\'' || c == ']';
  };
  int64_t line = 1;
  bool line_start = true;  // nothing but spaces since the last newline
  char prev = '\n';        // the last character outside strings, spaces and comments ('\n' at a line's start)
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') {
      ++line;
      line_start = true;
      prev = '\n';
      put("\n");
    } else if (c == '#') {  // a comment, to the end of the line
      const size_t end = std::min(text.find('\n', i), text.size());
      for (; i < end; ++i) put(static_cast<unsigned char>(text[i]) < 0x80 ? text.substr(i, 1) : "?");
      --i;
    } else if (c == '"' || c == '\'') {  // a string: '...', "...", '''...''' or """..."""
      // Only where TOML lets a string start (a key at a line's start or after '.', a value after '=', '[' or
      // ','): elsewhere (after a value: `x = 0"...`) toml++ reads what follows as bare text, and its test for
      // non-ASCII whitespace reaches __builtin_unreachable.
      KILN_CHECK(prev == '\n' || prev == '=' || prev == '[' || prev == ',' || prev == '.', "finetune",
                 "{}:{}: a quote after '{}' (strings stand after '=', '[' or ',', or begin a key)", path, line, prev);
      const std::string_view delim = text.substr(i, 3) == std::string(3, c) ? text.substr(i, 3) : text.substr(i, 1);
      put(delim);
      size_t j = i + delim.size();
      const int64_t start_line = line;
      for (; j < text.size() && text.substr(j, delim.size()) != delim; ++j) {
        if (text[j] == '\n' && delim.size() == 1) break;
        if (c == '"' && text[j] == '\\') {  // an escape: the next character is not a delimiter
          KILN_CHECK(j + 1 >= text.size() || static_cast<unsigned char>(text[j + 1]) < 0x80, "finetune",
                     "{}:{}: a backslash before a non-ASCII character in a string (not an escape)", path, line);
          put(text.substr(j, 2));
          ++j;
        } else if (static_cast<unsigned char>(text[j]) >= 0x80) {
          const size_t first = j;
          const int32_t cp = data::next_code_point(text, j);
          KILN_CHECK(cp >= 0, "finetune", "{}:{}: a string holds bytes that are not UTF-8", path, line);
          if (c == '"') {
            put(cp > 0xFFFF ? fmt::format("\\U{:08X}", cp) : fmt::format("\\u{:04X}", cp));
          } else {
            out.parsed += text.substr(first, j - first);
            out.structure += std::string(j - first, 'x');
          }
          --j;  // the loop steps past the sequence's last byte
          continue;
        } else {
          put(text.substr(j, 1));
        }
        if (j < text.size() && text[j] == '\n') ++line;
      }
      KILN_CHECK(j < text.size() && text[j] != '\n', "finetune", "{}:{}: an unterminated string (a {} with no closing {})",
                 path, start_line, c == '"' ? "double quote" : "single quote", delim);
      put(delim);
      i = j + delim.size() - 1;
      line_start = false;
      prev = c;
    } else {
      KILN_CHECK(static_cast<unsigned char>(c) < 0x80, "finetune",
                 "{}:{}: a non-ASCII character outside a string or comment (byte 0x{:02X})", path, line,
                 static_cast<unsigned char>(c));
      // toml++ 3.3 asserts (UB in a release build) on a brace where an array expects a value ("u=[[}"):
      // inline tables are no kiln setting anyway
      KILN_CHECK(c != '{' && c != '}', "finetune",
                 "{}:{}: '{}' outside a string: inline tables are not kiln settings (key = value lines of strings, "
                 "numbers, booleans and arrays of strings)",
                 path, line, c);
      if ((prev == '=' || prev == '[' || prev == ',') && c >= '0' && c <= '9') {  // a bare value starts
        // toml++ 3.3 asserts (UB in a release build) on a date-like value followed by a space and one digit
        // ("1---------- 0"): dates and times are no kiln setting, so a value starting with a digit takes a
        // '-' only in an exponent.
        const size_t end = std::min(text.find_first_of(" \t\r\n,]#", i), text.size());
        for (size_t k = i + 1; k < end; ++k)
          KILN_CHECK(text[k] != '-' || text[k - 1] == 'e' || text[k - 1] == 'E', "finetune",
                     "{}:{}: '{}' is no number (dates and times are not kiln settings)", path, line, text.substr(i, end - i));
      }
      if (line_start && c == '[') {  // [table] or [[array of tables]]
        size_t j = i + 1 < text.size() && text[i + 1] == '[' ? i + 2 : i + 1;
        while (j < text.size() && (text[j] == ' ' || text[j] == '\t')) ++j;
        KILN_CHECK(j == text.size() || key_start(text[j]), "finetune",
                   "{}:{}: a table header needs a key after '[' (kiln's settings are plain key = value lines)", path, line);
      }
      if (c != ' ' && c != '\t') {
        line_start = false;
        prev = c;
      }
      put(text.substr(i, 1));
    }
  }
  return out;
}

}  // namespace

void add_finetune_options(CLI::App& cmd, FinetuneConfig& c) {
  for (const Field& f : fields()) {
    std::visit(
        [&](auto m) {
          using T = std::remove_cvref_t<decltype(c.*m)>;
          // `--flag`, `--flag=false` and `--flag false` all work
          if constexpr (std::is_same_v<T, bool>) cmd.add_flag(flag_name(f.name), c.*m, f.help)->expected(0, 1);
          else cmd.add_option(flag_name(f.name), c.*m, f.help)->capture_default_str();
        },
        f.member);
  }
  cmd.add_option("--config-file", c.config_file, "TOML file with any of these settings (flags win over it)");
}

void apply_given_flags(const CLI::App& cmd, const FinetuneConfig& from, FinetuneConfig& to) {
  for (const Field& f : fields())
    if (cmd.get_option(flag_name(f.name))->count() > 0) std::visit([&](auto m) { to.*m = from.*m; }, f.member);
}

void FinetuneConfig::load_toml(const std::string& path) {
  const std::string text = read_file(path, "finetune");
  const TomlText checked = check_toml_input(text, path);
  toml::table t;
  try {
    if (checked.structure != checked.parsed) (void)toml::parse(checked.structure, path);  // the literal strings are strings
    t = toml::parse(checked.parsed, path);
  } catch (const toml::parse_error& e) {
    KILN_FAIL("finetune", "{}:{}: {}", path, e.source().begin.line, std::string(e.description()));
  }
  for (auto&& entry : t) {  // not a structured binding: clang 14 cannot capture one in the lambda below
    const std::string k(entry.first.str());
    auto& node = entry.second;
    const Field* f = nullptr;
    for (const Field& x : fields())
      if (k == x.name) f = &x;
    KILN_CHECK(f != nullptr, "finetune", "{}: unknown setting '{}'", path, k);
    std::visit(
        [&](auto m) {
          using T = std::remove_cvref_t<decltype(this->*m)>;
          auto bad = [&](const char* want) { KILN_FAIL("finetune", "{}: '{}' must be {}", path, k, want); };
          if constexpr (std::is_same_v<T, std::string>) {
            if (!node.is_string()) bad("a string");
            this->*m = node.as_string()->get();
          } else if constexpr (std::is_same_v<T, bool>) {
            if (!node.is_boolean()) bad("true or false");
            this->*m = node.as_boolean()->get();
          } else if constexpr (std::is_same_v<T, double>) {
            if (!node.is_number()) bad("a number");
            // (an integer too large for a double to hold exactly still reads, rounded)
            this->*m = node.is_integer() ? static_cast<double>(node.as_integer()->get()) : node.as_floating_point()->get();
          } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            if (!node.is_array()) bad("an array of strings");
            T v;
            for (auto&& e : *node.as_array()) {
              if (!e.is_string()) bad("an array of strings");
              v.push_back(e.as_string()->get());
            }
            this->*m = v;
          } else {
            if (!node.is_integer() || node.as_integer()->get() < 0) bad("a non-negative integer");
            this->*m = static_cast<T>(node.as_integer()->get());
          }
        },
        f->member);
  }
}

std::string FinetuneConfig::to_toml() const {
  std::ostringstream out;
  out << "# kiln finetune settings (run again with --config-file this file)\n";
  for (const auto& [name, value] : settings()) out << name << " = " << value << "\n";
  return out.str();
}

std::vector<std::pair<std::string, std::string>> FinetuneConfig::settings() const {
  std::vector<std::pair<std::string, std::string>> all;
  for (const Field& f : fields()) {
    std::ostringstream out;
    std::visit(
        [&](auto m) {
          using T = std::remove_cvref_t<decltype(this->*m)>;
          const T& v = this->*m;
          if constexpr (std::is_same_v<T, std::string>) {
            out << nlohmann::json(v).dump();  // a JSON string is a valid TOML basic string
          } else if constexpr (std::is_same_v<T, bool>) {
            out << (v ? "true" : "false");
          } else if constexpr (std::is_same_v<T, double>) {
            out << fmt::format("{}", v);
            if (fmt::format("{}", v).find_first_of(".e") == std::string::npos) out << ".0";
          } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            out << "[";
            for (size_t i = 0; i < v.size(); ++i) out << (i ? ", " : "") << nlohmann::json(v[i]).dump();
            out << "]";
          } else {
            out << v;
          }
        },
        f.member);
    all.emplace_back(f.name, out.str());
  }
  return all;
}

std::string FinetuneConfig::fingerprint() const {
  std::ostringstream out;
  for (const Field& f : fields()) {
    if (!f.in_fingerprint) continue;
    std::visit(
        [&](auto m) {
          using T = std::remove_cvref_t<decltype(this->*m)>;
          out << f.name << "=";
          if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            for (const auto& s : this->*m) out << s << ",";
          } else {
            out << this->*m;
          }
          out << ";";
        },
        f.member);
  }
  return out.str();
}

bool FinetuneConfig::plans_memory(int world_size) const {
  if (memory_budget >= 0) return true;
  return !checkpointing && world_size == 1 && !shard && chunked_head;
}

void FinetuneConfig::validate() const {
  KILN_CHECK(mlp_chunk >= 0, "finetune", "--mlp-chunk must be 0 (off) or a number of tokens, found {}", mlp_chunk);
  KILN_CHECK(mlp_chunk == 0 || !compile, "finetune",
             "--mlp-chunk runs the MLP in checkpointed pieces, which the compiled decoder layers (--compile) do not "
             "trace: use one of them");
  KILN_CHECK(segment_layers == 0 || segment_layers >= 2, "finetune",
             "--segment-layers must be 0 (off) or at least 2 blocks (1 is --checkpointing itself), found {}", segment_layers);
  KILN_CHECK(segment_layers == 0 || checkpointing, "finetune",
             "--segment-layers groups checkpointed blocks: add --checkpointing (or let --memory-budget choose)");
  KILN_CHECK(segment_layers == 0 || !compile, "finetune",
             "--segment-layers with --compile is not supported: the compiled blocks are not run inside segments; use one of them");
  KILN_CHECK(!offload || checkpointing, "finetune",
             "--offload moves checkpointed blocks' inputs to host memory: add --checkpointing (or let --memory-budget "
             "choose, without --offload)");
  KILN_CHECK(host_memory_budget >= 0, "finetune",
             "--host-memory-budget must be >= 0 GiB (0: half of the host's free memory), found {}", host_memory_budget);
  KILN_CHECK(memory_budget < 0 || chunked_head, "finetune",
             "--memory-budget plans for the chunked loss head: drop --chunked-head false or --memory-budget");
  KILN_CHECK(base == "nf4" || base == "bf16", "finetune", "--base must be nf4 or bf16, found '{}'", base);
  KILN_CHECK(!full || base == "bf16", "finetune",
             "--full trains every weight, and an NF4 base cannot be trained: add --base bf16 (the model's dtype)");
  KILN_CHECK(!full || !shard, "finetune", "--full with --shard is not supported (sharded full training saves no model yet)");
  KILN_CHECK(lora_r > 0 && lora_alpha > 0, "finetune", "--lora-r and --lora-alpha must be positive, found {} and {}", lora_r, lora_alpha);
  KILN_CHECK(lora_dropout >= 0 && lora_dropout < 1, "finetune", "--lora-dropout must be in [0, 1), found {}", lora_dropout);
  KILN_CHECK(seq_len >= 2 && batch_size >= 1 && grad_accum >= 1, "finetune",
             "need --seq-len >= 2, --batch-size >= 1, --grad-accum >= 1, found {}, {}, {}", seq_len, batch_size, grad_accum);
  KILN_CHECK(steps > 0 || epochs > 0, "finetune", "give --steps or --epochs");
  KILN_CHECK(lr > 0 && weight_decay >= 0 && clip >= 0, "finetune", "need --lr > 0, --weight-decay >= 0, --clip >= 0");
  KILN_CHECK(eval_fraction >= 0 && eval_fraction < 1, "finetune", "--eval-fraction must be in [0, 1), found {}", eval_fraction);
  KILN_CHECK(text_split == "auto" || text_split == "file" || text_split == "blank_lines" || text_split == "separator",
             "finetune", "--text-split must be auto, file, blank_lines or separator, found '{}'", text_split);
  KILN_CHECK(eval_batches >= 1, "finetune",
             "--eval-batches must be >= 1, found {} (to skip the eval loss: --eval-every 0 or --eval-fraction 0)", eval_batches);
  KILN_CHECK(!output.empty(), "finetune", "--output must name a folder");
  KILN_CHECK(model_dir.empty() || config.empty(), "finetune", "give --model or --config, not both");
  KILN_CHECK(config.empty() || random_init, "finetune",
             "--config {} builds a model with random weights: add --random-init (or give --model DIR)", config);
  KILN_CHECK(!random_init || !config.empty(), "finetune",
             "--random-init needs --config NAME (tiny, llama3.1-8b, ...; the old default job: --config tiny --random-init)");
}

std::string FinetuneConfig::base_model_dir() const {
  return model_dir.empty() && config.empty() ? data::default_base_path() : model_dir;
}

}  // namespace kiln::app
