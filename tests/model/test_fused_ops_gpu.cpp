// The fused paths the model and the trainer take on CUDA (label gpu; every test skips where
// LibTorch sees no GPU, as on the CPU build machine), each against the composite it replaces, on
// the GPU: our kernels (core/base/cuda_kernels.cu: RoPE, SwiGLU, the one-rank cross-entropy; fp32,
// bf16, fp16; values and gradients; the autograd node checked to be ours), LibTorch's rms_norm
// and its multi-tensor AdamW over several steps with weight decay and a clipping factor. With
// LibTorch 1.13 (no such ops) the LibTorch ones check the composite against itself and say so.
// Run: ctest -L gpu --output-on-failure
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/base/cuda_kernel_args.h"
#include "core/base/torch_compat.h"
#include "core/model/fused_ops.h"
#include "parallel/tp_cross_entropy.h"
#include "tests/model/fused_test_util.h"

namespace andy {
namespace {

using namespace fused_test;

#define SKIP_WITHOUT_GPU()                                                                   \
  if (!at::hasCUDA())                                                                        \
  GTEST_SKIP() << "no CUDA device visible to this LibTorch ("                                \
               << (compat::torch_has_cuda() ? "CUDA build" : "CPU-only build") << ")"

const at::TensorOptions kGpu = at::TensorOptions().device(at::kCUDA);

// The autograd node of f's output on fresh leaves: our CUDA function where the kernels are built.
template <typename F>
void expect_node(F f, std::vector<at::Tensor> inputs, const std::string& want) {
  for (auto& t : inputs) t = t.detach().clone().requires_grad_(true);
  const at::Tensor out = f(inputs);
  ASSERT_TRUE(out.grad_fn());
  const std::string name = out.grad_fn()->name();
  if (ANDYLLM_CUDA_KERNELS) EXPECT_NE(name.find(want), std::string::npos) << "autograd node " << name;
  else std::printf("  no CUDA kernels in this build: %s runs\n", name.c_str());
}

struct DtypeCase {
  at::ScalarType dtype;
  double tol;
  const char* name;
};
const DtypeCase kDtypes[] = {{at::kFloat, 1e-5, "fp32"}, {at::kBFloat16, 2e-2, "bf16"}, {at::kHalf, 4e-3, "fp16"}};

TEST(FusedOpsGpu, RopeKernelMatchesComposite) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(11);
  const int64_t b = 3, t = 17, h = 5;
  // d = 64: the 16-byte vector kernel; d = 12 (6 pairs per head, no whole vector): the scalar one.
  for (const int64_t d : {64, 12})
  for (const auto& c : kDtypes) {
    at::Tensor cos = at::randn({b, t, d}, kGpu), sin = at::randn({b, t, d}, kGpu);
    at::Tensor x = at::randn({b, t, h, d}, kGpu).to(c.dtype), up = at::randn({b, t, h, d}, kGpu);
    auto fast = value_and_grads([&](auto& in) { return rope_bthd(in[0], cos, sin); }, {x}, up);
    // The composite in fp32 (one rounding, as the kernel), rounded to the dtype at the end.
    auto ref = value_and_grads([&](auto& in) { return rope_bthd_unfused(in[0].to(at::kFloat), cos, sin).to(c.dtype); },
                               {x}, up);
    expect_close(fast, ref, c.tol, std::string("rope d=") + std::to_string(d) + " " + c.name);
    expect_node([&](auto& in) { return rope_bthd(in[0], cos, sin); }, {x}, "RopeCudaFn");
  }
}

TEST(FusedOpsGpu, SwigluKernelMatchesComposite) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(13);
  // 7 x 1001: the scalar kernels; 8 x 1024: the 16-byte vector ones.
  for (auto shape : {std::vector<int64_t>{7, 1001}, std::vector<int64_t>{8, 1024}})
  for (const auto& c : kDtypes) {
    at::Tensor g = at::randn(shape, kGpu).mul(3), u = at::randn(shape, kGpu), up = at::randn(shape, kGpu);
    g = g.to(c.dtype);
    u = u.to(c.dtype);
    auto fast = value_and_grads([](auto& in) { return swiglu(in[0], in[1]); }, {g, u}, up);
    auto ref = value_and_grads(
        [&](auto& in) { return swiglu_unfused(in[0].to(at::kFloat), in[1].to(at::kFloat)).to(c.dtype); }, {g, u}, up);
    expect_close(fast, ref, c.tol, std::string("swiglu ") + c.name);
    expect_node([](auto& in) { return swiglu(in[0], in[1]); }, {g, u}, "SwigluCudaKernels");
  }
}

TEST(FusedOpsGpu, RmsNormMatchesComposite) {
  SKIP_WITHOUT_GPU();
  if (!compat::kHasNativeRmsNorm) std::printf("  LibTorch %s: no at::rms_norm, the composite runs\n", TORCH_VERSION);
  at::manual_seed(3);
  for (int64_t d : {64, 768, 771}) {
    at::Tensor x = at::randn({4, 37, d}, kGpu), w = at::randn({d}, kGpu), up = at::randn({4, 37, d}, kGpu);
    auto fast = value_and_grads([](auto& in) { return rms_norm(in[0], in[1], 1e-5); }, {x, w}, up);
    auto ref = value_and_grads([](auto& in) { return rms_norm_unfused(in[0], in[1], 1e-5); }, {x, w}, up);
    expect_close(fast, ref, 2e-5, "rms_norm d=" + std::to_string(d));
  }
}

// bf16 / fp16 x (the residual stream of precision.fp32_residual = false) with a weight of x's
// dtype (rms_norm) or fp32 (rms_norm_in_dtype, what RMSNorm calls: the weight cast to x's dtype):
// LibTorch's rms_norm against the composite in fp32, rounded at the end; values, x's and the
// weight's gradients (the fp32 weight's in fp32). d = 768 and 771, 37 and 1000 rows.
TEST(FusedOpsGpu, RmsNormReducedPrecisionMatchesComposite) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(4);
  for (const int64_t d : {768, 771})
  for (const int64_t rows : {37, 1000})
  for (const auto& c : kDtypes) {
    if (c.dtype == at::kFloat) continue;
    for (const bool w_fp32 : {false, true}) {
      const std::string what = std::string("rms_norm ") + c.name + " d=" + std::to_string(d) + " rows=" +
                               std::to_string(rows) + (w_fp32 ? " fp32 weight" : "");
      at::Tensor x = at::randn({2, rows / 2 + 1, d}, kGpu).mul(3).to(c.dtype), up = at::randn({2, rows / 2 + 1, d}, kGpu);
      at::Tensor w = at::randn({d}, kGpu).to(w_fp32 ? at::kFloat : c.dtype);
      auto op = [w_fp32](auto& in) { return w_fp32 ? rms_norm_in_dtype(in[0], in[1], 1e-5) : rms_norm(in[0], in[1], 1e-5); };
      auto fast = value_and_grads(op, {x, w}, up);
      auto ref = value_and_grads(
          [&](auto& in) { return rms_norm_unfused(in[0].to(at::kFloat), in[1].to(at::kFloat), 1e-5).to(c.dtype); },
          {x, w}, up);
      expect_close(fast, ref, c.tol, what);
    }
  }
}

TEST(FusedOpsGpu, MultiTensorAdamWMatchesCompositeOverSteps) {
  SKIP_WITHOUT_GPU();
  if (!compat::kHasFusedAdamw) std::printf("  LibTorch %s: no _fused_adamw_, per-parameter updates run\n", TORCH_VERSION);
  at::manual_seed(5);
  for (double wd : {0.0, 0.1})
    for (double scale : {1.0, 0.37}) {
      std::vector<at::Tensor> p1, m1, v1, p2, m2, v2;
      for (auto shape : {std::vector<int64_t>{1000, 33}, {768}, {7, 5, 3}}) {
        p1.push_back(at::randn(shape, kGpu));
        m1.push_back(at::zeros(shape, kGpu));
        v1.push_back(at::zeros(shape, kGpu));
        p2.push_back(p1.back().clone());
        m2.push_back(m1.back().clone());
        v2.push_back(v1.back().clone());
      }
      const at::Tensor start = p1[0].clone();
      for (int step = 1; step <= 5; ++step) {
        std::vector<at::Tensor> g1, g2;
        for (const auto& p : p1) g1.push_back(at::randn_like(p).mul(step));
        for (const auto& g : g1) g2.push_back(g.mul(scale));  // the composite gets the clipped gradient
        AdamWHyper h = adamw_hyper(step, wd, scale);
        adamw_update_group(p1, g1, m1, v1, h, step);
        h.grad_scale = 1.0;
        for (size_t i = 0; i < p2.size(); ++i) adamw_update_unfused(p2[i], g2[i], m2[i], v2[i], h);
      }
      for (size_t i = 0; i < p1.size(); ++i) {
        EXPECT_LT(rel_err(p1[i], p2[i]), 1e-5) << "param " << i << " wd " << wd << " scale " << scale;
        EXPECT_LT(rel_err(m1[i], m2[i]), 1e-5) << "exp_avg " << i << " wd " << wd << " scale " << scale;
        EXPECT_LT(rel_err(v1[i], v2[i]), 1e-5) << "exp_avg_sq " << i << " wd " << wd << " scale " << scale;
      }
      EXPECT_GT(rel_err(p1[0], start), 1e-4) << "it moved";
    }
}

TEST(FusedOpsGpu, OneRankCrossEntropyMatchesComposite) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(9);
  // vocab 1000: rows read in 16-byte vectors; 1001: element by element.
  for (const int64_t vocab : {1000, 1001})
  for (auto [dtype, tol] : {std::pair{at::kFloat, 1e-5}, std::pair{at::kBFloat16, 1e-2}, std::pair{at::kHalf, 4e-3}}) {
    const int64_t n = 67;
    at::Tensor targets = at::randint(0, vocab, {n}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
    targets[0] = -100;
    targets[5] = -100;
    at::Tensor logits = at::randn({n, vocab}, kGpu).mul(3).to(dtype), up = at::randn({n}, kGpu);
    expect_node([&](auto& in) { return vocab_parallel_cross_entropy(in[0], targets, nullptr, 0, vocab, -100, true); },
                {logits}, "CudaCrossEntropy");
    auto fast = value_and_grads(
        [&](auto& in) { return vocab_parallel_cross_entropy(in[0], targets, nullptr, 0, vocab, -100, true); }, {logits},
        up);
    auto ref = value_and_grads(
        [&](auto& in) { return vocab_parallel_cross_entropy(in[0], targets, nullptr, 0, vocab, -100, false); },
        {logits}, up);
    expect_close(fast, ref, tol, std::string("cross-entropy ") + c10::toString(dtype) + " vocab " + std::to_string(vocab));
    EXPECT_EQ(fast[0][0].item<float>(), 0.0f) << "an ignored target's loss is 0";
    EXPECT_EQ(fast[1][0].abs().sum().item<float>(), 0.0f) << "and its row's gradient";
  }
  // A GPT-2-sized vocabulary (every thread of a row's block loops), large logits (the running
  // maximum must rescale the sum) and a target's logit far above the rest.
  at::Tensor big = at::randn({5, 32000}, kGpu).mul(20).to(at::kBFloat16), up = at::randn({5}, kGpu);
  at::Tensor t5 = at::tensor({0L, 31999L, 17L, -100L, 12345L}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  big.index_put_({2, 17}, 200.0f);
  auto fast = value_and_grads([&](auto& in) { return vocab_parallel_cross_entropy(in[0], t5, nullptr, 0, 32000, -100, true); },
                              {big}, up);
  auto ref = value_and_grads([&](auto& in) { return vocab_parallel_cross_entropy(in[0], t5, nullptr, 0, 32000, -100, false); },
                             {big}, up);
  expect_close(fast, ref, 1e-2, "cross-entropy bf16, vocab 32000");
}

}  // namespace
}  // namespace andy
