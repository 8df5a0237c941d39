// andyllm serve driven by the official `openai` npm client (the version pinned in package.json).
// Run by tests/serve/test_serve_e2e.cpp against a server it started:
//   ANDYLLM_URL=http://127.0.0.1:PORT ANDYLLM_MODEL=tiny node suite.mjs
// Prints "ok NAME" or "FAIL NAME: why" per check; exits 1 when any check failed.
import assert from "node:assert/strict";
import OpenAI from "openai";

const url = process.env.ANDYLLM_URL;
const model = process.env.ANDYLLM_MODEL;
const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });

const checks = [];
const check = (name, fn) => checks.push([name, fn]);

async function metric(name) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = text.match(new RegExp(`^${name}\\{[^}]*\\} (\\S+)$`, "m"));
  return m ? Number(m[1]) : NaN;
}

// Concatenated text per choice, finish reasons per choice, and the usage chunk of a stream.
async function drain(stream, chat) {
  const text = {}, finish = {}, first = {};
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (!(c.index in first)) first[c.index] = chat ? c.delta : c;
      text[c.index] = (text[c.index] ?? "") + (chat ? c.delta.content ?? "" : c.text);
      if (c.finish_reason) (finish[c.index] ??= []).push(c.finish_reason);
    }
  }
  return { text, finish, first, usage };
}

check("models.list names the served model", async () => {
  const models = await client.models.list();
  assert.equal(models.data[0].id, model);
});

check("completion: streamed text equals the whole text, usage chunk", async () => {
  const req = { model, prompt: "the cat", max_tokens: 16, temperature: 0, ignore_eos: true };
  const whole = await client.completions.create(req);
  assert.equal(whole.object, "text_completion");
  assert.equal(whole.choices[0].finish_reason, "length");
  assert.equal(whole.usage.completion_tokens, 16);
  const s = await drain(await client.completions.create({ ...req, stream: true, stream_options: { include_usage: true } }), false);
  assert.equal(s.text[0], whole.choices[0].text);
  assert.deepEqual(s.finish[0], ["length"]);
  assert.deepEqual(s.usage, whole.usage);
});

check("chat: whole and streamed, role first", async () => {
  const req = { model, messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "the cat" }],
                max_completion_tokens: 8, temperature: 0, ignore_eos: true };
  const whole = await client.chat.completions.create(req);
  assert.equal(whole.object, "chat.completion");
  assert.equal(whole.choices[0].message.role, "assistant");
  const s = await drain(await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } }), true);
  assert.equal(s.first[0].role, "assistant");
  assert.equal(s.text[0], whole.choices[0].message.content);
  assert.deepEqual(s.finish[0], [whole.choices[0].finish_reason]);
  assert.deepEqual(s.usage, whole.usage);
});

check("stop strings cut the text, finish_reason stop", async () => {
  const base = { model, prompt: "the dog", max_tokens: 24, temperature: 0, ignore_eos: true };
  const full = (await client.completions.create(base)).choices[0].text;
  const stop = full.slice(Math.floor(full.length / 2), Math.floor(full.length / 2) + 2);
  const r = await client.completions.create({ ...base, stop: [stop] });
  assert.equal(r.choices[0].text, full.slice(0, full.indexOf(stop)));
  assert.equal(r.choices[0].finish_reason, "stop");
  const s = await drain(await client.completions.create({ ...base, stop, stream: true }), false);
  assert.equal(s.text[0], r.choices[0].text);
});

check("n and seed: repeatable, one choice per completion", async () => {
  const req = { model, prompt: "a red tree", max_tokens: 6, n: 2, seed: 3, temperature: 1, ignore_eos: true };
  const a = await client.completions.create(req), b = await client.completions.create(req);
  assert.equal(a.choices.length, 2);
  assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text));
});

check("logprobs in both shapes", async () => {
  const c = await client.completions.create({ model, prompt: "river", max_tokens: 4, logprobs: 2, ignore_eos: true });
  assert.equal(c.choices[0].logprobs.tokens.length, 4);
  assert.equal(c.choices[0].logprobs.token_logprobs.length, 4);
  const h = await client.chat.completions.create({ model, messages: [{ role: "user", content: "river" }], max_tokens: 4,
                                                   logprobs: true, top_logprobs: 2, ignore_eos: true });
  assert.equal(h.choices[0].logprobs.content.length, 4);
  assert.equal(h.choices[0].logprobs.content[0].top_logprobs.length, 2);
});

check("errors arrive as the client's APIError with status and param", async () => {
  const cases = [
    [{ model, prompt: "a", temperature: -1 }, 400, "temperature"],
    [{ model, prompt: "a", suffix: "b" }, 400, "suffix"],
    [{ model, prompt: "a", max_tokens: 1000 }, 400, "prompt"],
    [{ model: "gpt-nothing", prompt: "a" }, 404, "model"],
  ];
  for (const [body, status, param] of cases) {
    await assert.rejects(client.completions.create(body), (e) => {
      assert.ok(e instanceof OpenAI.APIError, String(e));
      assert.equal(e.status, status);
      assert.equal(e.param, param);
      return true;
    });
  }
});

check("a stream abandoned by the client is cancelled, its blocks freed", async () => {
  const stream = await client.completions.create({ model, prompt: ["the cat", "a dog"], n: 64, max_tokens: 50,
                                                   ignore_eos: true, stream: true });
  for await (const chunk of stream) { void chunk; break; }  // break aborts the HTTP request
  let running = 1, usage = 1;
  for (let i = 0; i < 100 && (running !== 0 || usage !== 0); i++) {
    await new Promise((r) => setTimeout(r, 100));
    running = await metric("vllm:num_requests_running");
    usage = await metric("vllm:kv_cache_usage_perc");
  }
  assert.equal(running, 0);
  assert.equal(usage, 0);
});

let failed = 0;
for (const [name, fn] of checks) {
  try {
    await fn();
    console.log(`ok ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.stack ?? e}`);
  }
}
console.log(`${checks.length - failed}/${checks.length} checks passed`);
process.exit(failed ? 1 : 0);
