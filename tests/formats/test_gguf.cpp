// The GGUF writer (core/model/gguf.h) read back by an independent reader written from the
// format's description (tests/formats/gguf_reference.py, numpy): key/values of every type,
// tensor dims reversed, offsets aligned to 32, F32/F16 bytes, and Q8_0 blocks byte-identical to
// ggml's reference quantizer (quantize_row_q8_0_ref) re-implemented there. Also: the Q/K row
// permutation to llama.cpp's interleaved RoPE layout, and the tensor names.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/model/gguf.h"
#include "core/model/gguf_llama.h"
#include "tests/data/data_test_util.h"
#include "tests/launch/run_command.h"

namespace {

using json = nlohmann::json;
namespace dt = andy::data::testing;
using andy::testing_util::run_command;
using andy::testing_util::source_dir;

void dump_f32(const at::Tensor& t, const std::string& file) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  std::ofstream(file, std::ios::binary).write(static_cast<const char*>(c.data_ptr()), c.numel() * 4);
}

TEST(Gguf, AnIndependentReaderReadsWhatWeWrite) {
  if (run_command("/usr/bin/python3 -c 'import numpy'").exit_code != 0)
    GTEST_SKIP() << "Debian's python3-numpy is not installed";
  dt::TempDir dir("andyllm-gguf");
  at::manual_seed(5);
  andy::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", 7);
  w.add_i32("x.neg", -3);
  w.add_f32("llama.rope.freq_base", 10000.0f);
  w.add_bool("tokenizer.ggml.add_bos_token", false);
  w.add_string_array("tokenizer.ggml.tokens", {"<pad>", "▁世界", "<0x0A>"});
  w.add_f32_array("tokenizer.ggml.scores", {0.0f, -1.5f, 2.25f});
  w.add_i32_array("tokenizer.ggml.token_type", {3, 1, 6});
  // Values with exact ties at .5 after scaling, zeros, and a block of all zeros.
  at::Tensor q = at::randn({6, 64});
  q[2].zero_();
  q[3] = at::arange(64).to(at::kFloat) - 31.5;
  const std::vector<std::pair<std::string, std::pair<at::Tensor, andy::GgmlType>>> tensors = {
      {"a.f32", {at::randn({3, 5}), andy::GgmlType::kF32}},
      {"b.f16", {at::randn({7}), andy::GgmlType::kF16}},
      {"c.q8_0", {q, andy::GgmlType::kQ8_0}}};
  for (const auto& [name, tt] : tensors) {
    w.add_tensor(name, tt.first, tt.second);
    dump_f32(tt.first, dir / (name + ".f32"));
  }
  w.write(dir / "t.gguf");
  auto r = run_command("/usr/bin/python3 " + source_dir() + "/tests/formats/gguf_reference.py " + (dir / "t.gguf") +
                       " " + dir.path() + " 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = json::parse(r.output);
  EXPECT_EQ(j["version"], 3);
  EXPECT_EQ(j["kv"]["general.architecture"], "llama");
  EXPECT_EQ(j["kv"]["llama.block_count"], 7);
  EXPECT_EQ(j["kv"]["x.neg"], -3);
  EXPECT_EQ(j["kv"]["llama.rope.freq_base"], 10000.0);
  EXPECT_EQ(j["kv"]["tokenizer.ggml.add_bos_token"], false);
  EXPECT_EQ(j["kv"]["tokenizer.ggml.tokens"], json::array({"<pad>", "▁世界", "<0x0A>"}));
  EXPECT_EQ(j["kv"]["tokenizer.ggml.scores"], json::array({0.0, -1.5, 2.25}));
  EXPECT_EQ(j["kv"]["tokenizer.ggml.token_type"], json::array({3, 1, 6}));
  EXPECT_EQ(j["data_start"].get<int64_t>() % 32, 0);
  ASSERT_EQ(j["tensors"].size(), 3u);
  EXPECT_EQ(j["tensors"][0]["dims"], json::array({5, 3})) << "dims are the shape reversed";
  EXPECT_EQ(j["tensors"][2]["type"], 8);
  for (const json& t : j["tensors"]) {
    EXPECT_TRUE(t["aligned"].get<bool>()) << t.dump();
    EXPECT_TRUE(t["equal"].get<bool>()) << t["name"] << ": bytes differ from the reference";
  }
  // The last tensor's data, padded to the alignment as ggml's and gguf-py's writers do, ends the file.
  const json& last = j["tensors"][2];
  const int64_t end = j["data_start"].get<int64_t>() + last["offset"].get<int64_t>() + 6 * 2 * 34;
  EXPECT_EQ(j["file_size"].get<int64_t>(), (end + 31) / 32 * 32);
}

TEST(Gguf, RotaryRowsBecomeInterleavedPairs) {
  // One head of 8 rows (d = 8): rotate_half pairs row j with row j + 4; llama.cpp wants them
  // adjacent: 0 4 1 5 2 6 3 7.
  at::Tensor w = at::arange(16).to(at::kFloat).view({16, 1});  // two heads
  at::Tensor p = andy::permute_rotary_rows(w, 2).view({-1});
  const std::vector<float> want = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(p[i].item<float>(), want[i]) << i;
  EXPECT_EQ(andy::gguf_tensor_name("model.layers.11.self_attn.k_proj.weight"), "blk.11.attn_k.weight");
  EXPECT_EQ(andy::gguf_tensor_name("model.embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(andy::gguf_tensor_name("lm_head.weight"), "output.weight");
  EXPECT_THROW(andy::gguf_tensor_name("model.layers.0.mlp.bias"), andy::Error);
}

TEST(Gguf, Q8_0RoundTripsWithinHalfAStep) {
  at::manual_seed(6);
  at::Tensor x = at::randn({4 * 32});
  const auto blocks = andy::quantize_q8_0(x.data_ptr<float>(), x.numel());
  ASSERT_EQ(blocks.size(), 4u * 34u);
  const auto back = andy::dequantize_q8_0(blocks.data(), x.numel());
  for (int b = 0; b < 4; ++b) {
    const float amax = x.slice(0, b * 32, b * 32 + 32).abs().max().item<float>();
    for (int i = 0; i < 32; ++i) EXPECT_NEAR(back[b * 32 + i], x[b * 32 + i].item<float>(), amax / 127 * 0.51);
  }
}

}  // namespace
