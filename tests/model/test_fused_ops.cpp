// The fused CPU kernels (core/model/fused_ops.h) against the unfused LibTorch composites they
// replace: values and gradients, fp32 and bf16, widths that are not multiples of 8, several
// intra-op threads; AdamW over several steps; the fused cross-entropy; attention with grouped kv
// heads against the same attention on repeated keys and values.
#include <gtest/gtest.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "core/base/avx2_math.h"
#include "core/model/attention.h"
#include "core/model/fused_ops.h"
#include "parallel/cpu_gemm.h"
#include "parallel/tp_cross_entropy.h"
#include "tests/model/fused_test_util.h"

namespace andy {
namespace {

using namespace fused_test;

struct Case {
  at::ScalarType dtype;
  double tol;
};
const Case kCases[] = {{at::kFloat, 2e-6}, {at::kBFloat16, 2e-2}};

class FusedOps : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fused_ops_apply(at::zeros({1}))) << "this CPU lacks AVX2/FMA or ANDYLLM_FUSED_OPS=0";
    at::set_num_threads(GetParam());
    at::manual_seed(7);
  }
};

// Each test also runs inputs large enough that the kernel's at::parallel_for splits them (rows
// above row_grain), so that with 2 threads every chunk boundary and the per-thread parts of
// RMSNorm's weight gradient are exercised.
TEST_P(FusedOps, RmsNormMatchesComposite) {
  for (const Case& c : kCases) {
    for (const std::vector<int64_t>& shape : {std::vector<int64_t>{3, 5, 128}, {3, 5, 37}, {601, 128}}) {
      const int64_t d = shape.back();
      at::Tensor x = at::randn(shape).mul(3).to(c.dtype);
      at::Tensor w = at::rand({d}).add(0.5);
      at::Tensor up = at::randn(shape);
      auto fused = value_and_grads([&](auto& in) { return rms_norm(in[0], in[1], 1e-5); }, {x, w}, up);
      auto ref = value_and_grads([&](auto& in) { return rms_norm_unfused(in[0], in[1], 1e-5); }, {x, w}, up);
      expect_close(fused, ref, c.tol, "rms_norm " + c10::str(at::IntArrayRef(shape)) + " " + c10::toString(c.dtype));
    }
  }
}

// Serving in bf16: bf16 activations and a bf16 weight without gradients take the one-pass
// kernel, which rounds where the composite does (bf16(w * bf16(x * rstd))): equal to it except
// where the two sums of squares, added in different orders, put x * rstd on either side of a
// bf16 rounding boundary (one bf16 step apart at most).
TEST_P(FusedOps, RmsNormInBf16WithoutGradMatchesComposite) {
  at::NoGradGuard no_grad;
  for (int64_t d : {512, 128, 37}) {
    at::Tensor x = at::randn({64, d}).mul(3).to(at::kBFloat16);
    at::Tensor w = at::rand({d}).add(0.5).to(at::kBFloat16);
    at::Tensor got = rms_norm(x, w, 1e-5), want = rms_norm_unfused(x, w, 1e-5);
    ASSERT_EQ(got.scalar_type(), at::kBFloat16);
    ASSERT_EQ(got.sizes(), want.sizes());
    at::Tensor g = got.to(at::kFloat), r = want.to(at::kFloat);
    const double differ = g.ne(r).to(at::kDouble).mean().item<double>();
    EXPECT_LT(differ, 0.01) << "d=" << d;
    EXPECT_TRUE(at::allclose(g, r, 1e-2, 1e-2)) << "d=" << d << " max diff " << (g - r).abs().max().item<float>();
  }
}

// Training's residual add fused with the next norm (add_rms_norm): bit for bit the values and
// the gradients (x, delta, weight) of the two ops (x + delta, then rms_norm), with both outputs
// used, only the norm's (the final norm), and only the sum's.
TEST_P(FusedOps, TrainingAddRmsNormEqualsAddThenNorm) {
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{3, 5, 128}, {3, 37}, {601, 128}}) {
    const int64_t d = shape.back();
    const at::Tensor x = at::randn(shape).mul(3), delta = at::randn(shape), w = at::rand({d}).add(0.5);
    const at::Tensor up_h = at::randn(shape), up_y = at::randn(shape);
    for (int use = 0; use < 3; ++use) {  // 0: both outputs, 1: the norm's only, 2: the sum's only
      auto run = [&](bool fused) {
        at::Tensor xl = x.clone().requires_grad_(true), dl = delta.clone().requires_grad_(true),
                   wl = w.clone().requires_grad_(true);
        at::Tensor h, y;
        if (fused) {
          std::tie(h, y) = add_rms_norm(xl, dl, wl, 1e-5);
        } else {
          h = xl + dl;
          y = rms_norm(h, wl, 1e-5);
        }
        at::Tensor loss = at::zeros({});
        if (use != 1) loss = loss + (h * up_h).sum();
        if (use != 2) loss = loss + (y * up_y).sum();
        loss.backward();
        return std::vector<at::Tensor>{h.detach(), y.detach(), xl.grad(), dl.grad(), wl.grad()};
      };
      const auto got = run(true), want = run(false);
      for (size_t i = 0; i < want.size(); ++i) {
        const std::string what = c10::str(at::IntArrayRef(shape)) + " use " + std::to_string(use) + " #" +
                                 std::to_string(i);
        ASSERT_EQ(got[i].defined(), want[i].defined()) << what;
        if (want[i].defined()) {
          EXPECT_TRUE(at::equal(got[i], want[i])) << what;
        }
      }
    }
  }
}

// Inference's residual add fused with the next norm: bit for bit the two ops' values, the
// residual updated in place; nothing done (an undefined result, the residual untouched) where it
// does not apply: with gradients tracked, bf16, mismatched shapes.
TEST_P(FusedOps, AddRmsNormEqualsAddThenNorm) {
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{32, 128}, {3, 37}, {601, 128}}) {
    const int64_t d = shape.back();
    const at::Tensor x = at::randn(shape).mul(3), delta = at::randn(shape), w = at::rand({d}).add(0.5);
    const at::Tensor sum = x + delta, want = rms_norm(sum, w, 1e-5);
    at::Tensor residual = x.clone();
    at::Tensor got;
    {
      at::NoGradGuard no_grad;
      got = add_rms_norm_fp32_(residual, delta, w, 1e-5);
    }
    ASSERT_TRUE(got.defined()) << at::IntArrayRef(shape);
    EXPECT_TRUE(at::equal(residual, sum)) << at::IntArrayRef(shape);
    EXPECT_TRUE(at::equal(got, want)) << at::IntArrayRef(shape) << " max diff " << (got - want).abs().max().item<float>();
  }
  const at::Tensor x = at::randn({4, 16}), w = at::ones({16});
  at::Tensor r = x.clone();
  EXPECT_FALSE(add_rms_norm_fp32_(r, x, w, 1e-5).defined()) << "gradient mode is on";
  at::NoGradGuard no_grad;
  at::Tensor rb = x.to(at::kBFloat16);
  EXPECT_FALSE(add_rms_norm_fp32_(rb, rb, w, 1e-5).defined()) << "bf16";
  EXPECT_FALSE(add_rms_norm_fp32_(r, at::randn({4, 8}), w, 1e-5).defined()) << "shapes";
  EXPECT_TRUE(at::equal(r, x));
}

TEST_P(FusedOps, CausalSoftmaxMatchesComposite) {
  for (const Case& c : kCases) {
    // [B, H, T, S]: whole sequences (q_offset 0) and a chunk of queries after a prefix, widths
    // that are not multiples of 8.
    for (auto [t, s, off] : {std::tuple<int64_t, int64_t, int64_t>{13, 13, 0}, {16, 16, 0}, {5, 21, 16}, {1, 9, 8},
                             {129, 129, 0}}) {
      at::Tensor x = at::randn({2, 3, t, s}).mul(4).to(c.dtype);
      at::Tensor up = at::randn({2, 3, t, s});
      auto fused = value_and_grads([&](auto& in) { return causal_softmax(in[0], 0.37, off); }, {x}, up);
      auto ref = value_and_grads([&](auto& in) { return causal_softmax_unfused(in[0], 0.37, off); }, {x}, up);
      const std::string what = "causal_softmax t=" + std::to_string(t) + " s=" + std::to_string(s) + " q_offset=" +
                               std::to_string(off) + " " + c10::toString(c.dtype);
      expect_close(fused, ref, c.tol, what);
      // Masked positions: exactly zero probability and gradient.
      const at::Tensor hidden = at::arange(s).unsqueeze(0).gt(at::arange(t).add(off).unsqueeze(1));
      EXPECT_EQ(fused[0].masked_select(hidden).abs().sum().item<double>(), 0.0) << what;
      EXPECT_EQ(fused[1].masked_select(hidden).abs().sum().item<double>(), 0.0) << what;
      EXPECT_LT(rel_err(fused[0].to(at::kFloat).sum(-1), at::ones({2, 3, t})), c.tol) << what << ": rows sum to 1";
    }
  }
}

TEST_P(FusedOps, SwigluMatchesComposite) {
  for (const Case& c : kCases)
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{4, 7, 131}, {41, 1000}}) {
    at::Tensor g = at::randn(shape).mul(4).to(c.dtype), u = at::randn(shape).to(c.dtype);
    at::Tensor up = at::randn(shape);
    auto fused = value_and_grads([&](auto& in) { return swiglu(in[0], in[1]); }, {g, u}, up);
    auto ref = value_and_grads([&](auto& in) { return swiglu_unfused(in[0], in[1]); }, {g, u}, up);
    expect_close(fused, ref, c.tol, "swiglu " + c10::str(at::IntArrayRef(shape)) + " " + c10::toString(c.dtype));
  }
}

TEST_P(FusedOps, RopeMatchesCompositeAndInvertsItself) {
  for (auto [b, t, h, d] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{2, 9, 3, 20}, {2, 130, 8, 32}}) {
    RopeTables tables = make_rope_tables(d, 256, 10000.0);
    at::Tensor pos = at::randint(0, 256, {b, t}, at::kLong);
    at::Tensor cos = tables.cos.index_select(0, pos.view(-1)).view({b, t, d});
    at::Tensor sin = tables.sin.index_select(0, pos.view(-1)).view({b, t, d});
    const std::string rows = std::to_string(b * t * h) + " rows of " + std::to_string(d) + " ";
    for (const Case& c : kCases) {
      // A strided input (a transposed view), as the attention hands it over.
      at::Tensor x = at::randn({b, h, t, d}).to(c.dtype).transpose(1, 2);
      at::Tensor up = at::randn({b, t, h, d});
      auto fused = value_and_grads([&](auto& in) { return rope_bthd(in[0], cos, sin); }, {x}, up);
      auto ref = value_and_grads([&](auto& in) { return rope_bthd_unfused(in[0], cos, sin); }, {x}, up);
      expect_close(fused, ref, c.tol, "rope " + rows + c10::toString(c.dtype));
    }
    // A rotation preserves each pair's norm: the fused kernel's backward is its transpose.
    at::Tensor x = at::randn({b, t, h, d});
    at::Tensor y = rope_bthd(x, cos, sin);
    EXPECT_LT(rel_err(y.pow(2).sum(-1), x.pow(2).sum(-1)), 1e-5) << rows;
  }
}

TEST_P(FusedOps, AdamWMatchesCompositeOverSteps) {
  for (int64_t rows : {1000, 1001})  // 1001 x 33 = 33033: the 8-wide loop's scalar tail too
  for (double wd : {0.0, 0.1})
  for (double scale : {1.0, 0.37}) {  // a clipping factor: as the composite on the clipped gradient
    at::Tensor p1 = at::randn({rows, 33}), m1 = at::zeros_like(p1), v1 = at::zeros_like(p1);
    at::Tensor p2 = p1.clone(), m2 = m1.clone(), v2 = v1.clone();
    for (int step = 1; step <= 5; ++step) {
      at::Tensor g = at::randn_like(p1).mul(step);
      const at::Tensor g_before = g.clone();
      AdamWHyper h = adamw_hyper(step, wd, scale);
      adamw_update(p1, g, m1, v1, h);
      ASSERT_TRUE(at::equal(g, g_before)) << "the gradient is left as it is";
      h.grad_scale = 1.0;
      adamw_update_unfused(p2, g.mul(scale), m2, v2, h);
    }
    EXPECT_LT(rel_err(p1, p2), 1e-6) << "wd " << wd << " scale " << scale;
    EXPECT_LT(rel_err(m1, m2), 1e-6) << "wd " << wd << " scale " << scale;
    EXPECT_LT(rel_err(v1, v2), 1e-6) << "wd " << wd << " scale " << scale;
    EXPECT_GT(rel_err(p1, at::zeros_like(p1).add(1)), 0.0);  // it moved
  }
}

TEST_P(FusedOps, GroupedAttentionMatchesRepeatedKv) {
  const int64_t b = 2, h = 6, h_kv = 2, t = 5, s = 8, d = 16;
  at::Tensor q = at::randn({b, h, t, d}), k = at::randn({b, h_kv, s, d}), v = at::randn({b, h_kv, s, d});
  at::Tensor up = at::randn({b, h, t, d});
  auto grouped = value_and_grads([&](auto& in) { return attention(in[0], in[1], in[2], s - t); }, {q, k, v}, up);
  auto repeated = value_and_grads(
      [&](auto& in) {
        return attention(in[0], in[1].repeat_interleave(h / h_kv, 1), in[2].repeat_interleave(h / h_kv, 1), s - t);
      },
      {q, k, v}, up);
  expect_close(grouped, repeated, 1e-5, "attention");
}

// Causal attention of whole sequences in query blocks (only the keys each block sees) against
// the composite on repeated keys and values: lengths around the 64-row blocks, 1 to 3 query
// heads per kv head, values and the gradients of q, k and v.
TEST_P(FusedOps, CausalBlockAttentionMatchesComposite) {
  if (!cpu_gemm_enabled()) GTEST_SKIP() << "no oneDNN sgemm in this process";
  for (auto [t, h, h_kv] : {std::tuple<int64_t, int64_t, int64_t>{1, 2, 2}, {37, 4, 2}, {64, 3, 1}, {65, 6, 2},
                            {150, 4, 4}, {200, 6, 2}}) {
    const int64_t b = 2, d = 16;
    at::Tensor q = at::randn({b, t, h, d}), k = at::randn({b, t, h_kv, d}), v = at::randn({b, t, h_kv, d});
    at::Tensor up = at::randn({b, t, h, d});
    const std::string what = "t=" + std::to_string(t) + " h=" + std::to_string(h) + " h_kv=" + std::to_string(h_kv);
    ASSERT_TRUE(causal_attention_cpu_applies(q, k, v)) << what;
    auto fused = value_and_grads([&](auto& in) { return causal_attention_cpu(in[0], in[1], in[2]); }, {q, k, v}, up);
    auto ref = value_and_grads(
        [&](auto& in) {
          const at::Tensor qh = in[0].transpose(1, 2), kh = in[1].transpose(1, 2).repeat_interleave(h / h_kv, 1),
                           vh = in[2].transpose(1, 2).repeat_interleave(h / h_kv, 1);
          const at::Tensor probs = causal_softmax_unfused(at::matmul(qh, kh.transpose(-2, -1)), 1.0 / std::sqrt(d), 0);
          return at::matmul(probs, vh).transpose(1, 2);
        },
        {q, k, v}, up);
    expect_close(fused, ref, 1e-5, "causal block attention " + what);
    // attention() on [B, H, T, d] views takes this path and gives the same.
    const at::Tensor via = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0).transpose(1, 2);
    EXPECT_LT(rel_err(via, fused[0]), 1e-6) << what;
  }
}

TEST_P(FusedOps, CrossEntropyMatchesComposite) {
  // A rank's slice of a padded vocabulary: columns 0..29 of 32 are real (global ids 40..69,
  // vocab_size 70), targets outside the slice, inside it, and ignored; then 301 rows of a
  // 512-wide slice with 510 real columns (split over the threads).
  for (auto [n, width, start, vocab] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{11, 32, 40, 70}, {301, 512, 0, 510}}) {
    const int64_t real = vocab - start;
    at::Tensor targets = at::randint(0, vocab, {n}, at::kLong);
    targets[0] = -100;
    targets[1] = start + 3;
    targets[2] = start + 29;
    targets[3] = 5;
    for (const Case& c : kCases) {
      at::Tensor logits = at::randn({n, width}).mul(5).to(c.dtype);
      at::Tensor up = at::randn({n});
      auto fused = value_and_grads(
          [&](auto& in) { return vocab_parallel_cross_entropy(in[0], targets, nullptr, start, vocab, -100, true); },
          {logits}, up);
      auto ref = value_and_grads(
          [&](auto& in) { return vocab_parallel_cross_entropy(in[0], targets, nullptr, start, vocab, -100, false); },
          {logits}, up);
      expect_close(fused, ref, c.dtype == at::kFloat ? 2e-6 : 1e-2,
                   "cross-entropy " + std::to_string(n) + " rows " + c10::toString(c.dtype));
      EXPECT_EQ(fused[1].narrow(1, real, width - real).abs().max().item<float>(), 0.0f);  // padding columns
      EXPECT_EQ(fused[1][0].abs().max().item<float>(), 0.0f);                              // ignored target
    }
  }
}

TEST_P(FusedOps, SumOfSquaresMatchesCompositeAndFlagsNonFinite) {
  // Sizes around the vector width and the 65536-element chunk.
  for (int64_t n : {0, 1, 15, 16, 17, 1000, 65536, 2 * 65536 + 3}) {
    const at::Tensor g = at::randn({n}) * 3.0;
    const double fused = sum_of_squares(g), composite = sum_of_squares_unfused(g);
    EXPECT_NEAR(fused, composite, 1e-12 * std::max(1.0, composite)) << n;
  }
  // Not contiguous, or not fp32: the composite.
  const at::Tensor m = at::randn({64, 48});
  EXPECT_NEAR(sum_of_squares(m.t()), sum_of_squares_unfused(m), 1e-9);
  EXPECT_NEAR(sum_of_squares(m.to(at::kBFloat16)), sum_of_squares_unfused(m.to(at::kBFloat16)), 1e-9);
  // Large fp32 values do not overflow; one inf or NaN anywhere (the tail too) makes it non-finite.
  EXPECT_DOUBLE_EQ(sum_of_squares(at::full({40}, 3e38f)), 40 * std::pow(static_cast<double>(3e38f), 2));
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()})
    for (int64_t at : {int64_t{0}, int64_t{70000}, int64_t{2 * 65536 + 2}}) {
      at::Tensor g = at::randn({2 * 65536 + 3});
      g[at] = bad;
      EXPECT_FALSE(std::isfinite(sum_of_squares(g))) << bad << " at " << at;
    }
}

// The vectorized maximum and argmax (the softmaxes' shift, greedy sampling) against scalar loops:
// every length around their 32- and 8-wide steps, the maximum (and ties) at every position class,
// all -inf, and NaN anywhere flagged.
TEST(VectorMath, MaxAndArgmaxMatchScalarLoops) {
  if (!has_avx2_fma()) GTEST_SKIP() << "no AVX2";
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {1, 7, 8, 9, 31, 32, 33, 40, 63, 64, 65, 100, 2048, 2051}) {
    for (int64_t at_pos : {int64_t{0}, n / 3, n - 1}) {
      std::vector<float> x(static_cast<size_t>(n));
      const at::Tensor r = at::randn({n}, gen);
      std::copy(r.data_ptr<float>(), r.data_ptr<float>() + n, x.begin());
      x[at_pos] = 100;
      if (at_pos + 9 < n) x[at_pos + 9] = 100;  // a later tie: the first one wins
      bool nan = true;
      EXPECT_EQ(argmax_f32_avx2(x.data(), n, nan), at_pos) << "n=" << n;
      EXPECT_FALSE(nan);
      EXPECT_EQ(max_avx2(x.data(), n), 100.0f) << "n=" << n;
      x[n - 1 - at_pos / 2] = std::numeric_limits<float>::quiet_NaN();
      argmax_f32_avx2(x.data(), n, nan);
      EXPECT_TRUE(nan) << "n=" << n;
    }
    std::vector<float> all(static_cast<size_t>(n), -inf);
    bool nan = true;
    EXPECT_EQ(argmax_f32_avx2(all.data(), n, nan), 0) << "n=" << n;
    EXPECT_FALSE(nan);
    EXPECT_EQ(max_avx2(all.data(), n), -inf);
  }
}

// The kernels split their rows over the intra-op threads (at::parallel_for) only where they were
// compiled with OpenMP; the build enables it where LibTorch shares GCC's libgomp (CMakeLists.txt).
TEST_P(FusedOps, KernelsUseTheIntraOpThreads) {
#if ANDYLLM_OPENMP
  EXPECT_EQ(kernel_threads(), GetParam());
#else
  EXPECT_EQ(kernel_threads(), 1);
  GTEST_SKIP() << "built without OpenMP (LibTorch does not share GCC's libgomp): the kernels run on one thread";
#endif
}

INSTANTIATE_TEST_SUITE_P(Threads, FusedOps, ::testing::Values(1, 2));

}  // namespace
}  // namespace andy
