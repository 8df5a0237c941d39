// Encodes texts with Hugging Face's own JS reader of tokenizer.json (@huggingface/tokenizers), an
// implementation independent of ours and of sentencepiece; tests/formats/test_hf_tokenizer.cpp
// compares its ids with sentencepiece's.
//
//   node tests/formats/node/tokenize.mjs <dir> <texts.json>
//
// <dir> holds tokenizer.json and tokenizer_config.json; <texts.json> is a JSON array of strings.
// Prints one JSON object to stdout: {"results": [{ids, tokens, ids_with_special, decoded,
// decoded_skip_special}, ...]} in the order of the texts (ids without / with the special tokens
// the post-processor adds; decoded: the ids without special tokens decoded back to text).
// The package is loaded from $ANDYLLM_FORMATS_NODE, by default build/formats-node of this
// checkout, where scripts/setup.sh installs tests/formats/node/package-lock.json.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.ANDYLLM_FORMATS_NODE ?? resolve(here, "../../../build/formats-node");
const { Tokenizer } = createRequire(join(nodeDir, "package.json"))("@huggingface/tokenizers");

const [dir, textsFile] = process.argv.slice(2);
if (!dir || !textsFile) {
  console.error("usage: node tokenize.mjs <dir with tokenizer.json and tokenizer_config.json> <texts.json>");
  process.exit(2);
}
const readJson = (file) => JSON.parse(readFileSync(file, "utf8"));
const tokenizer = new Tokenizer(readJson(join(dir, "tokenizer.json")), readJson(join(dir, "tokenizer_config.json")));

// Tokenizer.decode refuses an empty list; the empty text decodes to "".
const decode = (ids, options = {}) => (ids.length === 0 ? "" : tokenizer.decode(ids, options));

const results = readJson(textsFile).map((text) => {
  const plain = tokenizer.encode(text, { add_special_tokens: false });
  const withSpecial = tokenizer.encode(text, { add_special_tokens: true });
  return {
    ids: plain.ids,
    tokens: plain.tokens,
    ids_with_special: withSpecial.ids,
    decoded: decode(plain.ids),
    decoded_skip_special: decode(withSpecial.ids, { skip_special_tokens: true }),
  };
});
process.stdout.write(JSON.stringify({ results }) + "\n");
