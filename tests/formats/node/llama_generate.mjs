// llama.cpp itself (the prebuilt CPU build inside node-llama-cpp) on a GGUF file we exported:
// for each prompt, llama.cpp's tokenization and its greedy continuation, as JSON on stdout.
// Used by tests/formats/test_export_e2e.cpp and scripts/workflow_demo.sh.
//   node llama_generate.mjs MODEL.gguf PROMPTS.json MAX_TOKENS
// PROMPTS.json: a JSON array of strings. Output: [{"prompt", "prompt_ids", "ids", "text"}, ...].
// The prompt is tokenized without BOS (as `andyllm generate` does); generation is greedy
// (temperature 0) and stops at the end-of-generation token or after MAX_TOKENS.
import {readFileSync} from "node:fs";
import {dirname, join, resolve} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

// The package from $ANDYLLM_FORMATS_NODE, by default build/formats-node of this checkout, where
// scripts/setup.sh installs tests/formats/node/package-lock.json (ES modules ignore NODE_PATH).
const here = dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.ANDYLLM_FORMATS_NODE ?? resolve(here, "../../../build/formats-node");
const {getLlama} = await import(pathToFileURL(join(nodeDir, "node_modules/node-llama-cpp/dist/index.js")).href);

const [modelPath, promptsPath, maxTokensText] = process.argv.slice(2);
if (!modelPath || !promptsPath) {
  console.error("usage: node llama_generate.mjs MODEL.gguf PROMPTS.json [MAX_TOKENS]");
  process.exit(2);
}
const maxTokens = Number(maxTokensText ?? 16);
const prompts = JSON.parse(readFileSync(promptsPath, "utf8"));

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 256, sequences: 1});
const sequence = context.getSequence();
const results = [];
for (const prompt of prompts) {
  await sequence.clearHistory();  // nothing carried over between prompts
  const promptIds = model.tokenize(prompt, false);
  const ids = [];
  for await (const token of sequence.evaluate(promptIds, {temperature: 0})) {
    ids.push(token);
    if (ids.length >= maxTokens) break;
  }
  results.push({prompt, prompt_ids: promptIds, ids, text: model.detokenize(ids)});
}
await context.dispose();
process.stdout.write(JSON.stringify(results) + "\n");
await model.dispose();
await llama.dispose();
