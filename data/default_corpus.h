// Where kiln's defaults live: the default corpus (the King James Bible from Debian's bible-kjv, written to
// third_party/corpus/kjv.txt by tools/bootstrap.sh) and the small default tokenizer committed in
// data/default/ (a 4096-id byte-level BPE trained on that corpus by tools/make_default_tokenizer.py).
#pragma once
#include <string>

#include "data/dataset.h"

namespace kiln::data {

// $KILN_DEFAULT_CORPUS when set, else the bootstrap's third_party/corpus/kjv.txt. Throws kiln::Error
// ("[dataset] ... run tools/bootstrap.sh") when the file is missing.
std::string default_corpus_path();
// How to read it: one chapter per document, documents separated by blank lines.
TextOptions default_corpus_options();
// $KILN_DEFAULT_TOKENIZER when set, else data/default/tokenizer.json. Throws kiln::Error when missing.
std::string default_tokenizer_path();

}  // namespace kiln::data
