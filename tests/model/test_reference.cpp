// The model against an independent reference: tests/model/reference_llama.py, a float64
// PyTorch implementation written from the Hugging Face Llama equations, run by Debian's
// /usr/bin/python3 on the same weights and tokens. Compares logits, loss and every gradient.
// Skipped (with the reason) only where /usr/bin/python3 cannot import torch and numpy.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/model/llama.h"
#include "tests/model/model_test_util.h"

using namespace andy;
using andy::test::report;
namespace fs = std::filesystem;

namespace {

const char* kPython = "/usr/bin/python3";

std::string source_dir() {
  const char* env = std::getenv("ANDYLLM_SOURCE_DIR");
  return env ? env : ANDYLLM_TEST_SOURCE_DIR;
}

void write_raw(const fs::path& path, const at::Tensor& t) {
  at::Tensor c = t.detach().contiguous();
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(c.data_ptr()),
          static_cast<std::streamsize>(c.numel() * c.element_size()));
  ASSERT_TRUE(f.good()) << "cannot write " << path;
}

at::Tensor read_f64(const fs::path& path, at::IntArrayRef shape) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  std::ifstream f(path, std::ios::binary);
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * 8));
  EXPECT_TRUE(f.good()) << "cannot read " << t.numel() << " doubles from " << path;
  return t;
}

std::string shape_json(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void compare_with_reference(const ModelConfig& m, const std::string& name) {
  if (std::system((std::string(kPython) + " -c 'import torch, numpy' > /dev/null 2>&1").c_str()) !=
      0)
    GTEST_SKIP() << kPython << " cannot import torch and numpy (install Debian's python3-torch and "
                 << "python3-numpy): the independent PyTorch reference check is skipped";
  fs::path dir =
      fs::temp_directory_path() / ("andyllm_ref_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);

  LlamaForCausalLM model(m, nullptr, 2024);
  at::Tensor tokens = andy::test::random_tokens(2, 12, m.vocab_size, 31);
  at::Tensor targets = andy::test::random_tokens(2, 12, m.vocab_size, 32);
  targets.index_put_({1, at::arange(0, 12, 4)}, -100);
  at::Tensor logits = model->forward(tokens);
  at::Tensor loss = model->loss(logits, targets);
  loss.backward();

  StateDict full = model->full_state_dict();
  std::ostringstream meta;
  meta << "{\"config\": {\"dim\": " << m.dim << ", \"n_layer\": " << m.n_layer
       << ", \"n_head\": " << m.n_head << ", \"n_kv_head\": " << m.n_kv_head
       << ", \"vocab_size\": " << m.vocab_size << ", \"norm_eps\": " << m.norm_eps
       << ", \"rope_theta\": " << m.rope_theta
       << ", \"tie_embeddings\": " << (m.tie_embeddings ? "true" : "false")
       << "},\n \"tensors\": [";
  int i = 0;
  for (const auto& [n, t] : full) {
    std::string file = "w" + std::to_string(i) + ".bin";
    write_raw(dir / file, t);
    meta << (i++ ? ",\n  " : "\n  ") << "{\"name\": \"" << n << "\", \"file\": \"" << file
         << "\", \"shape\": " << shape_json(t.sizes()) << "}";
  }
  write_raw(dir / "tokens.bin", tokens);
  write_raw(dir / "targets.bin", targets);
  meta << "],\n \"tokens\": {\"file\": \"tokens.bin\", \"shape\": " << shape_json(tokens.sizes())
       << "},\n \"targets\": {\"file\": \"targets.bin\", \"shape\": " << shape_json(targets.sizes())
       << "}}\n";
  std::ofstream(dir / "meta.json") << meta.str();

  std::string cmd = std::string(kPython) + " " + source_dir() + "/tests/model/reference_llama.py " +
                    dir.string() + " > " + (dir / "log.txt").string() + " 2>&1";
  int rc = std::system(cmd.c_str());
  std::ifstream log_file(dir / "log.txt");
  std::string log((std::istreambuf_iterator<char>(log_file)), std::istreambuf_iterator<char>());
  std::printf("  %s", log.c_str());
  ASSERT_EQ(rc, 0) << cmd << "\n" << log;

  at::Tensor ref_logits = read_f64(dir / "logits.bin", {2, 12, m.vocab_size});
  double ref_loss = 0;
  std::ifstream(dir / "loss.txt") >> ref_loss;
  EXPECT_LT(
      report(name + ": logits vs Python reference", logits.narrow(-1, 0, m.vocab_size), ref_logits),
      1e-5);
  double loss_rel = std::abs(loss.item<double>() - ref_loss) / std::abs(ref_loss);
  std::printf("  %-60s %.8f vs %.8f  rel = %.3e\n", (name + ": loss vs Python reference").c_str(),
              loss.item<double>(), ref_loss, loss_rel);
  EXPECT_LT(loss_rel, 1e-5);
  StateDict grads = gather_full_state_dict(model->local_grads(), model->partition_specs(), nullptr);
  double worst = 0;
  std::string worst_name;
  for (const auto& [n, g] : grads) {
    double e = andy::test::rel_err(g, read_f64(dir / "grad" / (n + ".bin"), g.sizes()));
    if (e > worst) worst = e, worst_name = n;
  }
  std::printf("  %-60s worst rel = %.3e (%s)\n",
              (name + ": all " + std::to_string(grads.size()) + " grads vs Python").c_str(), worst,
              worst_name.c_str());
  EXPECT_LT(worst, 1e-5) << worst_name;
  fs::remove_all(dir);
}

}  // namespace

TEST(PythonReference, GqaUntied) {
  compare_with_reference(andy::test::tiny_config(false, 2), "gqa_untied");
}
TEST(PythonReference, MhaTied) {
  compare_with_reference(andy::test::tiny_config(true, 8), "mha_tied");
}
