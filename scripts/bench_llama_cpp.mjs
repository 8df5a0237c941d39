// llama.cpp (the prebuilt CPU build inside node-llama-cpp) on a GGUF file: decode throughput and
// latency at several concurrencies, measured the way `andyllm bench generate` measures ours, so
// the two can be compared on the same weights (docs/PERFORMANCE.md).
//   node scripts/bench_llama_cpp.mjs MODEL.gguf [--concurrency 1,32] [--input_len 128]
//        [--output_len 128] [--threads 1] [--seed 1]
// Per concurrency C: C sequences of one context (llama.cpp batches them into one decode per
// step), each a random prompt of input_len token ids, generating output_len tokens greedily
// (an end-of-generation token ends a sequence early; tokens are counted as generated). Prints
// one line per concurrency: decode tok/s (tokens after each sequence's first / the time from the
// last first token to the end), output tok/s, TTFT and TPOT.
import {dirname, join, resolve} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.ANDYLLM_FORMATS_NODE ?? resolve(here, "../build/formats-node");
const {getLlama} = await import(pathToFileURL(join(nodeDir, "node_modules/node-llama-cpp/dist/index.js")).href);

const args = process.argv.slice(2);
const modelPath = args[0];
const opt = (name, fallback) => {
  const i = args.indexOf("--" + name);
  return i >= 0 ? args[i + 1] : fallback;
};
if (!modelPath || modelPath.startsWith("--")) {
  console.error("usage: node scripts/bench_llama_cpp.mjs MODEL.gguf [--concurrency 1,32] [--input_len N] [--output_len N] [--threads N]");
  process.exit(2);
}
const concurrencies = opt("concurrency", "1,32").split(",").map(Number);
const inputLen = Number(opt("input_len", 128)), outputLen = Number(opt("output_len", 128));
const threads = Number(opt("threads", 1));
let seed = Number(opt("seed", 1));
const random = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const vocab = model.tokens.bos !== undefined ? model.fileInfo.metadata.llama.vocab_size : 4096;
const special = new Set([model.tokens.bos, model.tokens.eos, model.tokens.eot].filter((t) => t != null));
const randomPrompt = () => {
  const ids = [];
  while (ids.length < inputLen) {
    const t = 4 + Math.floor(random() * (vocab - 4));
    if (!special.has(t)) ids.push(t);
  }
  return ids;
};

console.log(`# llama.cpp (node-llama-cpp ${(await import(pathToFileURL(join(nodeDir, "node_modules/node-llama-cpp/package.json")).href, {with: {type: "json"}})).default.version}), ${modelPath}, ${threads} thread(s); input ${inputLen}, output ${outputLen} tokens`);
console.log(" conc   seconds   decode/s   output/s   TTFT ms mean   TPOT ms mean");
for (const c of concurrencies) {
  const context = await model.createContext({contextSize: c * (inputLen + outputLen + 8), sequences: c, threads,
                                             batchSize: Math.max(512, c * 16)});
  const start = performance.now();
  const runs = [];
  for (let s = 0; s < c; ++s) {
    const sequence = context.getSequence();
    const prompt = randomPrompt();
    runs.push((async () => {
      let first = 0, n = 0, last = 0;
      for await (const _ of sequence.evaluate(prompt, {temperature: 0})) {
        last = performance.now();
        if (n === 0) first = last;
        if (++n >= outputLen) break;
      }
      return {first, last, n};
    })());
  }
  const r = await Promise.all(runs);
  const end = performance.now();
  const decodeTokens = r.reduce((a, x) => a + Math.max(0, x.n - 1), 0);
  const total = r.reduce((a, x) => a + x.n, 0);
  const ttft = r.reduce((a, x) => a + (x.first - start), 0) / c;
  const tpot = r.reduce((a, x) => a + (x.n > 1 ? (x.last - x.first) / (x.n - 1) : 0), 0) / c;
  const decodeRate = decodeTokens / ((end - Math.min(...r.map((x) => x.first))) / 1000);
  console.log(`${String(c).padStart(5)} ${((end - start) / 1000).toFixed(2).padStart(9)} ${decodeRate.toFixed(0).padStart(10)} ` +
              `${(total / ((end - start) / 1000)).toFixed(0).padStart(10)} ${ttft.toFixed(1).padStart(14)} ${tpot.toFixed(2).padStart(14)}`);
  await context.dispose();
}
await model.dispose();
await llama.dispose();
