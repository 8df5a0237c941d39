// `andyllm export`, `quantize` and `eval` end to end, through the real executable, on a model
// trained here (at TP=2) until it has memorized a small English + Chinese corpus, so greedy
// continuations are prompt-specific with clear margins. Checked against independent readers:
// llama.cpp itself (node-llama-cpp's prebuilt CPU build) for GGUF; our safetensors reader and
// the original weights for the Hugging Face export (tests/formats/hf_reference.py runs the
// exported directory through an independent float64 LLaMA written from transformers'
// equations). Bad inputs stop with one line, a non-zero exit and nothing at the output path.
#include <gtest/gtest.h>
#include <sys/mount.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/model/hf_checkpoint.h"
#include "core/model/int8_weights.h"
#include "core/model/safetensors.h"
#include "core/model/weights_io.h"
#include "data/tokenizer.h"
#include "tests/data/data_test_util.h"
#include "tests/launch/run_command.h"
#include "tests/serve/serve_test_util.h"

namespace fs = std::filesystem;
using namespace andy::testing_util;
namespace dt = andy::data::testing;
using json = nlohmann::json;

namespace {

const std::vector<std::string> kSentences = {
    "the quick brown fox jumps over the lazy dog.",
    "a small red bird sings in the morning light.",
    "the river flows down to the sea under the old bridge.",
    "my friend reads a book about stars and planets.",
    "we walk to the market every saturday morning.",
    "the old clock on the wall ticks slowly all night.",
    "小猫在桌子上睡觉，阳光照在它的背上。",
    "我们明天早上一起去公园散步吧。",
    "春天来了，花园里开满了红色的花。",
    "hello 世界, the robot says 你好 to everyone.",
    "she plays the piano while it rains outside.",
    "north winds bring snow to the quiet village.",
};

const std::vector<std::string> kPrompts = {"the quick brown", "a small red", "the river flows",
                                           "小猫在桌子", "我们明天", "hello 世界, the robot", "she plays"};

std::string shell_quote(const std::string& s) { return "'" + s + "'"; }

// The last line of `output` that is a JSON object (a command's result; logs go around it).
json last_json_line(const std::string& output) {
  std::istringstream in(output);
  std::string line, found;
  while (std::getline(in, line))
    if (!line.empty() && line[0] == '{') found = line;
  EXPECT_FALSE(found.empty()) << "no JSON line in: " << output;
  return found.empty() ? json::object() : json::parse(found);
}

class ExportE2e : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new dt::TempDir("andyllm-export-e2e");
    write_corpus();
    auto r = run_command(andyllm_bin() + " preprocess --input_dir " + path("raw") + " --output_dir " +
                         path("data") + " --vocab_size 400 --txt_docs blank_lines");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    dt::write_file(path("model.toml"),
                   "[model]\ndim = 64\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nvocab_size = 400\n"
                   "max_seq_len = 64\ntie_embeddings = false\n[data]\ntrain_file = \"" + path("data/train") +
                   "\"\nval_file = \"" + path("data/validation") + "\"\ntokenizer_path = \"" +
                   path("data/tokenizer.model") + "\"\nseq_len = 32\n[train]\noutput_dir = \"" + path("run") +
                   "\"\nbatch_size = 8\nmax_steps = 160\nlearning_rate = 5e-3\nmin_learning_rate = 1e-3\n"
                   "warmup_steps = 5\nlog_interval = 40\neval_interval = 40\neval_batches = 2\n"
                   "intra_op_threads = 1\n[parallel]\ntensor_parallel_size = 2\n");
    r = run_command(mpirun(2) + andyllm_bin() + " train --config " + path("model.toml"));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }

  static void write_corpus() {
    fs::create_directories(path("raw"));
    std::mt19937 rng(11);
    std::ofstream f(path("raw/corpus.txt"));
    for (int i = 0; i < 1500; ++i) f << kSentences[rng() % kSentences.size()] << "\n\n";
  }

  static std::string path(const std::string& p) { return *dir_ / p; }
  static std::string best() { return path("run/best_model"); }
  static std::string checkpoint() {
    std::string last;
    for (const auto& e : fs::directory_iterator(path("run/checkpoints")))
      if (e.path().filename().string().rfind("step_", 0) == 0 && e.path().string() > last) last = e.path().string();
    return last;
  }

  // Greedy token ids (eos, when generated, dropped) of kPrompts from `model` on `ranks` ranks.
  static std::vector<std::vector<int>> ours(const std::string& model, int ranks, int max_tokens = 16) {
    std::string cmd = mpirun(ranks) + andyllm_bin() + " generate --model " + model +
                      " --temperature 0 --max_tokens " + std::to_string(max_tokens);
    for (const auto& p : kPrompts) cmd += " --prompt " + shell_quote(p);
    const std::string out = path("gen.jsonl");
    auto r = run_command(cmd + " --output " + out);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::vector<std::vector<int>> ids;
    std::ifstream f(out);
    for (std::string line; std::getline(f, line);) {
      auto v = json::parse(line)["token_ids"].get<std::vector<int>>();
      if (!v.empty() && v.back() == andy::data::kEosId) v.pop_back();
      ids.push_back(v);
    }
    EXPECT_EQ(ids.size(), kPrompts.size()) << r.output;
    return ids;
  }

  static std::string formats_node() {
    return env_or("ANDYLLM_FORMATS_NODE", source_dir() + "/build/formats-node");
  }
  static bool have_llama_cpp() {
    return fs::exists(formats_node() + "/node_modules/node-llama-cpp/package.json") &&
           run_command("node --version").exit_code == 0;
  }
  // llama.cpp's prompt ids and greedy ids for kPrompts.
  static json llama_cpp(const std::string& gguf, int max_tokens = 16) {
    json prompts = kPrompts;
    dt::write_file(path("prompts.json"), prompts.dump());
    auto r = run_command("ANDYLLM_FORMATS_NODE=" + formats_node() + " node " + source_dir() +
                         "/tests/formats/node/llama_generate.mjs " + gguf + " " + path("prompts.json") + " " +
                         std::to_string(max_tokens) + " > " + path("llama_cpp.json"));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    try {
      return json::parse(dt::read_text(path("llama_cpp.json")));
    } catch (const std::exception& e) {
      ADD_FAILURE() << "llama.cpp output is not JSON: " << r.output;
      return json::array();
    }
  }

  static double agreement(const std::vector<int>& a, const std::vector<int>& b) {
    size_t n = std::max(a.size(), b.size()), same = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) same += a[i] == b[i];
    return n == 0 ? 1.0 : static_cast<double>(same) / static_cast<double>(n);
  }

  static dt::TempDir* dir_;
};
dt::TempDir* ExportE2e::dir_ = nullptr;

andy::StateDict weights_of(const std::string& model) {
  return andy::load_full_state_dict(andy::resolve_model_source(model));
}

TEST_F(ExportE2e, MemorizedModelGivesPromptSpecificContinuations) {
  auto ids = ours(best(), 1);
  ASSERT_EQ(ids.size(), kPrompts.size());
  std::set<std::vector<int>> distinct(ids.begin(), ids.end());
  EXPECT_EQ(distinct.size(), ids.size()) << "continuations should differ per prompt";
}

TEST_F(ExportE2e, HuggingFaceExportOfATp2CheckpointImportsBitIdentical) {
  const std::string hf = path("hf32");
  auto r = run_command(andyllm_bin() + " export --format hf --model_path " + checkpoint() + " --output_dir " + hf);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* f : {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_TRUE(fs::exists(hf + "/" + f)) << f;
  const json cfg = json::parse(dt::read_text(hf + "/config.json"));
  EXPECT_EQ(cfg["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(cfg["hidden_size"], 64);
  EXPECT_EQ(cfg["num_key_value_heads"], 2);
  EXPECT_EQ(cfg["head_dim"], 16);
  EXPECT_EQ(cfg["tie_word_embeddings"], false);
  EXPECT_EQ(cfg["bos_token_id"], 2);
  EXPECT_EQ(cfg["eos_token_id"], 3);
  EXPECT_EQ(cfg["pad_token_id"], 0);
  EXPECT_TRUE(cfg["rope_scaling"].is_null());
  EXPECT_EQ(cfg["torch_dtype"], "float32");
  EXPECT_EQ(json::parse(dt::read_text(hf + "/tokenizer_config.json"))["add_bos_token"], false);
  andy::SafetensorsFile st = andy::SafetensorsFile::open(hf + "/model.safetensors");
  EXPECT_EQ(st.metadata().at("format"), "pt");
  EXPECT_TRUE(st.contains("lm_head.weight"));
  // Bit-identical to the checkpoint it came from.
  auto original = weights_of(checkpoint()), imported = weights_of(hf);
  ASSERT_EQ(original.size(), imported.size());
  for (const auto& [name, t] : original) EXPECT_TRUE(t.equal(imported.at(name))) << name;
  // And the same greedy tokens, served at TP = 1 and 2.
  const auto want = ours(checkpoint(), 1);
  EXPECT_EQ(ours(hf, 1), want);
  EXPECT_EQ(ours(hf, 2), want);
}

TEST_F(ExportE2e, IndependentReferenceRunsTheExportedDirectory) {
  if (run_command("/usr/bin/python3 -c 'import torch, numpy'").exit_code != 0)
    GTEST_SKIP() << "Debian's python3-torch / python3-numpy are not installed";
  const std::string hf = path("hf_ref");
  ASSERT_EQ(run_command(andyllm_bin() + " export --format hf --model_path " + best() + " --output_dir " + hf +
                        " --dtype bfloat16").exit_code, 0);
  json prompts = json::array();
  andy::data::Tokenizer tok = andy::data::Tokenizer::load(path("data/tokenizer.model"));
  for (const auto& p : kPrompts) prompts.push_back(tok.encode(p));
  dt::write_file(path("ref_prompts.json"), prompts.dump());
  auto r = run_command("/usr/bin/python3 " + source_dir() + "/tests/formats/hf_reference.py " + hf + " " +
                       path("ref_prompts.json") + " 16 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json ref = json::parse(r.output.substr(r.output.find('[')));
  // Our engine on the same bf16 weights (loaded as fp32), eos dropped as the reference does.
  const auto mine = ours(hf, 1);
  ASSERT_EQ(ref.size(), mine.size());
  for (size_t i = 0; i < mine.size(); ++i) EXPECT_EQ(ref[i].get<std::vector<int>>(), mine[i]) << kPrompts[i];
}

TEST_F(ExportE2e, ShardedBf16ExportHasAnIndexAndLoadsAtAnyTp) {
  const std::string hf = path("hf_bf16");
  auto r = run_command(andyllm_bin() + " export --format hf --model_path " + best() + " --output_dir " + hf +
                       " --dtype bfloat16 --max_shard_size 60KB");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_TRUE(fs::exists(hf + "/model.safetensors.index.json"));
  const json index = json::parse(dt::read_text(hf + "/model.safetensors.index.json"));
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_GE(files.size(), 3u);
  for (const auto& f : files) EXPECT_LE(fs::file_size(hf + "/" + f), 60'000u + 40'000u) << f;  // one tensor may overflow
  EXPECT_EQ(json::parse(dt::read_text(hf + "/config.json"))["torch_dtype"], "bfloat16");
  auto original = weights_of(best()), imported = weights_of(hf);
  for (const auto& [name, t] : original) EXPECT_TRUE(t.to(at::kBFloat16).to(at::kFloat).equal(imported.at(name))) << name;
  // A bf16 export re-exported as bf16 is unchanged, byte for byte.
  ASSERT_EQ(run_command(andyllm_bin() + " export --format hf --model_path " + hf + " --output_dir " + path("hf_bf16b") +
                        " --dtype bfloat16 --max_shard_size 60KB").exit_code, 0);
  for (const auto& f : files) EXPECT_EQ(dt::read_text(hf + "/" + f), dt::read_text(path("hf_bf16b/") + f)) << f;
  EXPECT_EQ(ours(hf, 2), ours(hf, 1));
  // float16 too.
  ASSERT_EQ(run_command(andyllm_bin() + " export --format hf --model_path " + best() + " --output_dir " + path("hf_fp16") +
                        " --dtype float16").exit_code, 0);
  EXPECT_EQ(json::parse(dt::read_text(path("hf_fp16/config.json")))["torch_dtype"], "float16");
  auto fp16 = weights_of(path("hf_fp16"));
  for (const auto& [name, t] : original) EXPECT_TRUE(t.to(at::kHalf).to(at::kFloat).equal(fp16.at(name))) << name;
}

TEST_F(ExportE2e, LlamaCppRunsTheGgufWithOurTokensAndContinuations) {
  if (!have_llama_cpp()) GTEST_SKIP() << "node-llama-cpp is not installed in " << formats_node() << " (scripts/setup.sh)";
  andy::data::Tokenizer tok = andy::data::Tokenizer::load(path("data/tokenizer.model"));
  const auto want = ours(best(), 1);
  for (const std::string dtype : {"f32", "f16", "q8_0"}) {
    const std::string gguf = path("model_" + dtype + ".gguf");
    auto r = run_command(andyllm_bin() + " export --format gguf --model_path " + best() + " --output " + gguf +
                         " --dtype " + dtype);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const json got = llama_cpp(gguf);
    ASSERT_EQ(got.size(), kPrompts.size()) << dtype;
    double agree = 0;
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      const auto prompt_ids = tok.encode(kPrompts[i]);
      EXPECT_EQ(got[i]["prompt_ids"].get<std::vector<int>>(), std::vector<int>(prompt_ids.begin(), prompt_ids.end()))
          << dtype << ": llama.cpp tokenizes '" << kPrompts[i] << "' differently";
      const auto ids = got[i]["ids"].get<std::vector<int>>();
      if (dtype != "q8_0") {
        EXPECT_EQ(ids, want[i]) << dtype << " '" << kPrompts[i] << "'";
      }
      agree += agreement(ids, want[i]) / kPrompts.size();
    }
    std::printf("[ llama.cpp ] %s: %.1f %% of greedy tokens equal to andyllm generate\n", dtype.c_str(), 100 * agree);
    if (dtype == "q8_0") {
      EXPECT_GE(agree, 0.9);
    }
  }
}

TEST_F(ExportE2e, Int8ModelIsSmallerServesAtAnyTpAndKeepsPerplexity) {
  const std::string q = path("int8");
  auto r = run_command(andyllm_bin() + " quantize --model_path " + best() + " --output_path " + q +
                       " --quantization_type dynamic");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(q + "/quantization.json"));
  // Linear weights at least 3.5x smaller.
  auto full = weights_of(best()), quant = weights_of(q);
  int64_t before = 0, after = 0;
  for (const auto& [name, t] : full)
    if (andy::is_int8_linear(name)) {
      before += t.numel() * t.element_size();
      ASSERT_EQ(quant.at(name).scalar_type(), at::kChar) << name;
      after += quant.at(name).numel() + quant.at(name + "_scale").numel() * 4;
    }
  EXPECT_GE(static_cast<double>(before) / after, 3.5);
  // Served at TP = 1 and 2; greedy tokens mostly those of the fp32 model.
  const auto want = ours(best(), 1);
  for (int tp : {1, 2}) {
    const auto got = ours(q, tp);
    double agree = 0;
    for (size_t i = 0; i < want.size(); ++i) agree += agreement(got[i], want[i]) / want.size();
    std::printf("[ int8 ] TP=%d: %.1f %% of greedy tokens equal to fp32\n", tp, 100 * agree);
    EXPECT_GE(agree, 0.8) << "TP=" << tp;
  }
  // Served over HTTP at TP=2: the greedy completion is generate's.
  {
    Job server(mpirun(2) + andyllm_bin() + " serve --port 0 --model " + q, path("serve_int8.log"));
    const int port = wait_for_server_port(server, 120);
    ASSERT_GT(port, 0) << server.output();
    const std::string url = "http://127.0.0.1:" + std::to_string(port);
    const json models = json::parse(run_command("curl -s " + url + "/v1/models").output);
    const json req = {{"model", models["data"][0]["id"]}, {"prompt", kPrompts[0]}, {"max_tokens", 16},
                      {"temperature", 0}};
    dt::write_file(path("req.json"), req.dump());
    auto c = run_command("curl -s -H 'Content-Type: application/json' -d @" + path("req.json") + " " + url +
                         "/v1/completions");
    const json resp = json::parse(c.output);
    andy::data::Tokenizer tok = andy::data::Tokenizer::load(path("data/tokenizer.model"));
    const auto ids = ours(q, 2)[0];
    EXPECT_EQ(resp["choices"][0]["text"], tok.decode(std::vector<int32_t>(ids.begin(), ids.end()))) << c.output;
    kill(server.pid, SIGUSR1);
    EXPECT_TRUE(server.wait_exit(60)) << server.output();
    EXPECT_EQ(server.exit_code(), 0) << server.output();
  }
  // Validation perplexity within 2 % of fp32.
  auto eval = [&](const std::string& model, int ranks) {
    auto e = run_command(mpirun(ranks) + andyllm_bin() + " eval --model_path " + model + " --val_file " +
                         path("data/validation"));
    EXPECT_EQ(e.exit_code, 0) << e.output;
    return last_json_line(e.output);
  };
  const double ppl32 = eval(best(), 1)["perplexity"], ppl8 = eval(q, 1)["perplexity"], ppl8_tp2 = eval(q, 2)["perplexity"];
  std::printf("[ int8 ] validation perplexity fp32 %.4f, int8 %.4f (TP=2: %.4f)\n", ppl32, ppl8, ppl8_tp2);
  EXPECT_LE(std::abs(ppl8 / ppl32 - 1), 0.02);
  EXPECT_LE(std::abs(ppl8_tp2 / ppl32 - 1), 0.02);
  // GGUF q8_0 can start from the int8 model.
  r = run_command(andyllm_bin() + " export --format gguf --model_path " + q + " --output " + path("from_int8.gguf") +
                  " --dtype q8_0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  if (have_llama_cpp()) {
    const json got = llama_cpp(path("from_int8.gguf"));
    double agree = 0;
    for (size_t i = 0; i < want.size(); ++i) agree += agreement(got[i]["ids"].get<std::vector<int>>(), want[i]) / want.size();
    std::printf("[ llama.cpp ] q8_0 from int8: %.1f %% of greedy tokens equal to fp32\n", 100 * agree);
    EXPECT_GE(agree, 0.8);
  }
}

TEST_F(ExportE2e, EvalReproducesTheTrainersValidationLossAtAnyTp) {
  const double val_loss = json::parse(dt::read_text(best() + "/meta.json"))["val_loss"];
  auto eval = [&](int ranks) {
    auto e = run_command(mpirun(ranks) + andyllm_bin() + " eval --model_path " + best() + " --val_file " +
                         path("data/validation") + " --batch_size 8 --max_batches 2 --seq_len 32");
    EXPECT_EQ(e.exit_code, 0) << e.output;
    return last_json_line(e.output);
  };
  const json one = eval(1), two = eval(2);
  EXPECT_NEAR(one["loss"].get<double>(), val_loss, 1e-5);
  EXPECT_NEAR(two["loss"].get<double>(), val_loss, 1e-5);
  EXPECT_NEAR(one["perplexity"].get<double>(), std::exp(val_loss), 1e-4);
  EXPECT_EQ(one["tokens"], 2 * 8 * 32);
}

// One line on stderr naming what is wrong, exit `code`, and nothing at `output`.
void expect_refused(const CommandResult& r, int code, const std::string& needle, const std::string& output) {
  EXPECT_EQ(r.exit_code, code) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
  if (output.empty()) return;
  EXPECT_FALSE(fs::exists(output)) << output;
  const std::string parent = fs::path(output).parent_path().string();
  if (!fs::exists(parent)) return;
  for (const auto& e : fs::directory_iterator(parent)) {
    EXPECT_EQ(e.path().string().find(".partial-"), std::string::npos) << "left behind: " << e.path();
  }
}

TEST_F(ExportE2e, BadInputIsRefusedWithOneLineAndNothingWritten) {
  const std::string bin = andyllm_bin() + " ";
  fs::create_directories(path("bad"));
  expect_refused(run_command(bin + "export --format onnx --model_path " + best() + " --output_dir " + path("bad/x")),
                 2, "--format 'onnx'", path("bad/x"));
  expect_refused(run_command(bin + "export --format hf --dtype int4 --model_path " + best() + " --output_dir " + path("bad/x")),
                 2, "--dtype 'int4'", path("bad/x"));
  expect_refused(run_command(bin + "export --format gguf --dtype q4_0 --model_path " + best() + " --output " + path("bad/x.gguf")),
                 2, "--dtype 'q4_0'", path("bad/x.gguf"));
  expect_refused(run_command(bin + "export --format hf --model_path " + path("nope") + " --output_dir " + path("bad/x")),
                 2, "no such file", path("bad/x"));
  expect_refused(run_command(bin + "export --format gguf --model_path " + best() + " --output " + path("bad/no_dir/x.gguf")),
                 2, "no_dir does not exist", path("bad/no_dir/x.gguf"));
  expect_refused(run_command(bin + "quantize --quantization_type static --model_path " + best() + " --output_path " + path("bad/q")),
                 2, "--quantization_type 'static'", path("bad/q"));
  // A Hugging Face directory of another architecture.
  ASSERT_EQ(run_command(bin + "export --format hf --model_path " + best() + " --output_dir " + path("bad/gpt2")).exit_code, 0);
  json cfg = json::parse(dt::read_text(path("bad/gpt2/config.json")));
  cfg["model_type"] = "gpt2";
  dt::write_file(path("bad/gpt2/config.json"), cfg.dump());
  expect_refused(run_command(bin + "export --format gguf --model_path " + path("bad/gpt2") + " --output " + path("bad/g.gguf")),
                 2, "model_type 'gpt2'", path("bad/g.gguf"));
  expect_refused(run_command(bin + "generate --model " + path("bad/gpt2") + " --prompt hi"), 2, "model_type 'gpt2'", "");
  cfg["model_type"] = "llama";
  cfg["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  dt::write_file(path("bad/gpt2/config.json"), cfg.dump());
  expect_refused(run_command(bin + "quantize --model_path " + path("bad/gpt2") + " --output_path " + path("bad/q")),
                 2, "rope_scaling", path("bad/q"));
  // Shapes q8_0 cannot express: rows of 48 values.
  andy::ModelConfig m;
  m.dim = 48;
  m.n_layer = 1;
  m.n_head = 4;
  m.n_kv_head = 4;
  m.ffn_dim = 96;
  m.vocab_size = 400;
  m.tie_embeddings = true;
  andy::StateDict w;
  for (const auto& [name, shape] : andy::model_tensor_shapes(m)) w[name] = at::randn(shape) * 0.02;
  fs::create_directories(path("bad/dim48"));
  andy::write_hf_model(w, m, at::kFloat, path("bad/dim48"), 1ull << 30);
  fs::copy_file(path("data/tokenizer.model"), path("bad/dim48/tokenizer.model"));
  expect_refused(run_command(bin + "export --format gguf --dtype q8_0 --model_path " + path("bad/dim48") + " --output " +
                             path("bad/d.gguf")), 2, "multiple of 32", path("bad/d.gguf"));
  EXPECT_EQ(run_command(bin + "export --format gguf --dtype f16 --model_path " + path("bad/dim48") + " --output " +
                        path("bad/d.gguf")).exit_code, 0) << "f16 can express any shape";
  // An existing output is kept unless --overwrite.
  dt::write_file(path("bad/exists.gguf"), "keep me");
  auto r = run_command(bin + "export --format gguf --model_path " + best() + " --output " + path("bad/exists.gguf"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  EXPECT_EQ(dt::read_text(path("bad/exists.gguf")), "keep me");
  r = run_command(bin + "export --format gguf --overwrite --model_path " + best() + " --output " + path("bad/exists.gguf"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(dt::read_text(path("bad/exists.gguf")).substr(0, 4), "GGUF");
}

TEST_F(ExportE2e, AFullDiskLeavesNoPartialOutput) {
  const std::string mnt = path("small_fs");
  fs::create_directories(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k") != 0)
    GTEST_SKIP() << "cannot mount a small tmpfs (needs root): " << std::strerror(errno);
  struct Unmount {
    std::string p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{mnt};
  auto r = run_command(andyllm_bin() + " export --format hf --model_path " + best() + " --output_dir " + mnt + "/hf");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("No space left on device"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("free on"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::is_empty(mnt)) << "a partial export was left on the full disk";
  r = run_command(andyllm_bin() + " export --format gguf --dtype f32 --model_path " + best() + " --output " + mnt + "/m.gguf");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(fs::is_empty(mnt));
  r = run_command(andyllm_bin() + " quantize --model_path " + best() + " --output_path " + mnt + "/q");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(fs::is_empty(mnt));
}

}  // namespace
