// Hugging Face tokenizer files for our sentencepiece BPE model, so that transformers'
// LlamaTokenizer / LlamaTokenizerFast (and vLLM, which loads them) encode exactly like
// sentencepiece does. tokenizer.json is what transformers' LlamaConverter
// (convert_slow_tokenizer.py) builds from a BPE .model with byte fallback:
//   model      BPE over the sentencepiece pieces (vocab: piece -> id), merges generated as its
//              SentencePieceExtractor does: for every piece, each split into two pieces that are
//              both in the vocabulary, ordered by the merged piece's score (best first; ties by
//              id), within one piece by the two halves' ids. Control, unknown and byte pieces
//              never take part in merges (sentencepiece never merges into or out of them).
//              Merges are written as ["left", "right"] pairs (tokenizers >= 0.20's format; a
//              piece may contain a space, which the older "left right" strings cannot carry).
//   normalizer Prepend("▁") (only with add_dummy_prefix), then Replace(" " -> "▁"); there is
//              no pre-tokenizer.
//   decoder    Replace("▁" -> " "), ByteFallback, Fuse, Strip(" ", 1, 0) (the Strip only with
//              add_dummy_prefix).
//   added_tokens  the control and unknown pieces (special), user-defined pieces (not special).
//   post_processor  bos first (add_bos_token true, add_eos_token false), as LlamaTokenizerFast.
// tokenizer_config.json says legacy: true: the slow LlamaTokenizer then encodes with
// sentencepiece itself, unchanged (legacy: false would drop the dummy prefix after special
// tokens and turn a "▁" in the text into a space), and the fast one keeps this tokenizer.json.
//
// Known difference from sentencepiece, as for every Hugging Face Llama tokenizer: text that
// contains a control piece's string ("<s>") is encoded as that special id by Hugging Face (and
// the text after it gets a "▁" prepended) but as ordinary pieces by sentencepiece.
//
//   write_hf_tokenizer_files("run/tokenizer.model", "run/hf", 2048, /*add_bos_token=*/false);
#pragma once

#include <string>

#include "data/sp_vocab.h"

namespace andy::data {

// Writes, into out_dir (which exists), the tokenizer files a LlamaTokenizer / LlamaTokenizerFast
// loads: tokenizer.model (a byte copy of model_file), tokenizer.json, tokenizer_config.json,
// special_tokens_map.json. Each file is written to a temporary name and renamed (an existing
// file is replaced whole or not at all). Throws IoError naming the file for an unreadable model
// or an unwritable directory, ConfigError when the model cannot be expressed (see
// hf_tokenizer_json).
// `add_bos_token`: whether the tokenizer puts bos in front of every text (tokenizer_config's
// add_bos_token and tokenizer.json's post-processor). Models trained here never saw bos at the
// start of a text (documents are separated by eos) and `andyllm generate` / `serve` add none,
// so their exports say false; transformers and vLLM then feed the model what we do.
void write_hf_tokenizer_files(const std::string& model_file, const std::string& out_dir,
                              int model_max_length, bool add_bos_token = false);

// The tokenizer.json text alone (for tests). Throws ConfigError for a model that no
// LlamaConverter-style tokenizer.json reproduces: not BPE, a normalization rule other than
// identity, remove_extra_whitespaces on, no unk piece, or a piece that is not valid UTF-8.
std::string hf_tokenizer_json(const SpVocab& v, bool add_bos_token = false);

// The tokenizer_config.json text alone (for tests).
std::string hf_tokenizer_config_json(const SpVocab& v, int model_max_length, bool add_bos_token = false);

}  // namespace andy::data
