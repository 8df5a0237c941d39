// oneDNN's sgemm behind the fp32 CPU linears (parallel/cpu_gemm.h): values and both gradients
// equal at::linear's (OpenBLAS) to fp32 rounding, for training and decode shapes; the cases it
// does not take (bf16, autocast, a single row through linear_rows' matrix-vector product) give
// at::linear's results; the raw sgemm's four transpose cases against a double reference; the
// batched products of the attention against at::matmul; the bf16 single-row product against a
// double reference.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/base/torch_compat.h"
#include "parallel/cpu_gemm.h"
#include "parallel/cpu_panel_gemm.h"
#include "parallel/tp_layers.h"

namespace andy {
namespace {

// Largest |a - b| over the largest |b|.
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() /
         std::max(1e-30, b.to(at::kDouble).abs().max().item<double>());
}

// Largest |got - want| beyond one bf16 rounding of a sum of k fp32 products (half a unit in the last
// place, 2^-8 relative, plus the fp32 sums): 0 when every element is within it.
double beyond_one_bf16_rounding(const at::Tensor& got, const at::Tensor& want, int64_t k) {
  const at::Tensor err = (got.to(at::kDouble).reshape(want.sizes()) - want).abs();
  const at::Tensor bound = want.abs() * (1.0 / 256) + 1e-4 * std::sqrt(static_cast<double>(k));
  return (err - bound).clamp_min(0).max().item<double>();
}

TEST(CpuGemm, IsAvailableWithDebiansLibTorch) {
  // Debian's libtorch_cpu links libdnnl.so.2, which exports dnnl_sgemm: without it every other
  // test here would only check the fallback.
  if (std::getenv("ANDYLLM_CPU_GEMM")) GTEST_SKIP() << "ANDYLLM_CPU_GEMM is set";
#if ANDYLLM_TORCH_AT_LEAST(2, 0)
  GTEST_SKIP() << "PyTorch's own LibTorch builds do not export dnnl_sgemm";
#else
  EXPECT_TRUE(cpu_gemm_enabled());
#endif
}

TEST(CpuGemm, SgemmTransposeCasesMatchADoubleReference) {
  if (!cpu_gemm_enabled()) GTEST_SKIP() << "no dnnl_sgemm in this process";
  torch::manual_seed(1);
  const int64_t m = 37, n = 53, k = 29;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      at::Tensor a = ta ? at::randn({k, m}) : at::randn({m, k});
      at::Tensor b = tb ? at::randn({n, k}) : at::randn({k, n});
      at::Tensor c = at::full({m, n}, 7.0f);  // overwritten (beta 0)
      cpu_sgemm(ta, tb, m, n, k, a.data_ptr<float>(), a.size(1), b.data_ptr<float>(), b.size(1), c.data_ptr<float>(), n);
      const at::Tensor ref = at::mm((ta ? a.t() : a).to(at::kDouble), (tb ? b.t() : b).to(at::kDouble));
      EXPECT_LT(rel_err(c, ref), 1e-5) << "trans_a " << ta << " trans_b " << tb;
    }
  }
}

TEST(CpuGemm, LinearValuesAndGradientsMatchAtLinear) {
  torch::manual_seed(2);
  // [batch, seq, in] training shapes, 32-row decode shapes, odd sizes.
  const std::vector<std::pair<std::vector<int64_t>, int64_t>> cases = {
      {{4, 16, 128}, 384}, {{32, 512}, 1536}, {{3, 7, 29}, 53}, {{2, 64}, 4096},
      // dW through the transposed product and a transpose back (N >= 4 K, N K >= 2^20), odd sizes
      {{3, 5, 257}, 4100}};
  for (const auto& [xs, out] : cases) {
    const at::Tensor x0 = at::randn(xs), w0 = at::randn({out, xs.back()}) * 0.1;
    const at::Tensor g = at::randn([&] {
      auto s = xs;
      s.back() = out;
      return s;
    }());
    at::Tensor x1 = x0.clone().requires_grad_(true), w1 = w0.clone().requires_grad_(true);
    at::Tensor x2 = x0.clone().requires_grad_(true), w2 = w0.clone().requires_grad_(true);
    const at::Tensor y1 = cpu_linear(x1, w1), y2 = at::linear(x2, w2);
    ASSERT_EQ(y1.sizes(), y2.sizes());
    EXPECT_LT(rel_err(y1, y2), 1e-5);
    (y1 * g).sum().backward();
    (y2 * g).sum().backward();
    EXPECT_LT(rel_err(x1.grad(), x2.grad()), 1e-5);
    EXPECT_LT(rel_err(w1.grad(), w2.grad()), 1e-5);
    // Only the weight needs a gradient (a frozen input), and no gradient at all.
    at::Tensor w3 = w0.clone().requires_grad_(true);
    (cpu_linear(x0, w3) * g).sum().backward();
    EXPECT_LT(rel_err(w3.grad(), w2.grad()), 1e-5);
    torch::NoGradGuard no_grad;
    EXPECT_LT(rel_err(cpu_linear(x0, w0), y2.detach()), 1e-5);
    EXPECT_LT(rel_err(linear_rows(x0, w0), y2.detach()), 1e-5);
  }
}

// The q/k/v (and gate/up) projections as one autograd node: values and every gradient against
// separate at::linear products, with one output unused (its gradient undefined), a frozen input,
// a frozen weight, and without gradients (cpu_linear of each).
TEST(CpuGemm, LinearGroupMatchesSeparateLinears) {
  torch::manual_seed(3);
  const at::Tensor x0 = at::randn({2, 9, 64});
  const std::vector<at::Tensor> w0 = {at::randn({64, 64}) * 0.1, at::randn({32, 64}) * 0.1, at::randn({40, 64}) * 0.1};
  for (int unused = -1; unused < 3; ++unused) {
    for (bool x_grad : {true, false}) {
      at::Tensor x1 = x0.clone().requires_grad_(x_grad), x2 = x0.clone().requires_grad_(x_grad);
      std::vector<at::Tensor> w1, w2;
      for (size_t i = 0; i < w0.size(); ++i) {
        const bool frozen = i == 1 && !x_grad;  // one frozen weight with the frozen input
        w1.push_back(w0[i].clone().requires_grad_(!frozen));
        w2.push_back(w0[i].clone().requires_grad_(!frozen));
      }
      const std::vector<at::Tensor> y1 = cpu_linear_group(x1, w1);
      ASSERT_EQ(y1.size(), w0.size());
      at::Tensor loss1 = at::zeros({}), loss2 = at::zeros({});
      for (size_t i = 0; i < w0.size(); ++i) {
        const at::Tensor y2 = at::linear(x2, w2[i]);
        ASSERT_EQ(y1[i].sizes(), y2.sizes());
        EXPECT_LT(rel_err(y1[i], y2), 1e-5);
        if (static_cast<int>(i) == unused) continue;
        const at::Tensor g = at::randn(y2.sizes());
        loss1 = loss1 + (y1[i] * g).sum();
        loss2 = loss2 + (y2 * g).sum();
      }
      loss1.backward();
      loss2.backward();
      const std::string what = "unused " + std::to_string(unused) + " x_grad " + std::to_string(x_grad);
      if (x_grad) {
        EXPECT_LT(rel_err(x1.grad(), x2.grad()), 1e-5) << what;
      }
      for (size_t i = 0; i < w0.size(); ++i) {
        ASSERT_EQ(w1[i].grad().defined(), w2[i].grad().defined()) << what << " weight " << i;
        if (w2[i].grad().defined()) {
          EXPECT_LT(rel_err(w1[i].grad(), w2[i].grad()), 1e-5) << what << " weight " << i;
        }
      }
    }
  }
  torch::NoGradGuard no_grad;
  const std::vector<at::Tensor> y = cpu_linear_group(x0, w0);
  for (size_t i = 0; i < w0.size(); ++i) EXPECT_TRUE(at::equal(y[i], cpu_linear(x0, w0[i])));
}

// The attention's two products: scores = q k^T (k a transposed view) and out = p v, values and
// both gradients against at::matmul; a permuted (neither row-major nor transposed) operand, a
// single-row one, and mismatched batch dims (at::matmul's broadcasting, not taken here).
TEST(CpuGemm, BatchedMatmulValuesAndGradientsMatchAtMatmul) {
  torch::manual_seed(4);
  const int64_t b = 2, h = 3, t = 17, s = 23, d = 16;
  const at::Tensor q0 = at::randn({b, h, t, d}), k0 = at::randn({b, h, s, d}), v0 = at::randn({b, h, s, d});
  const at::Tensor g0 = at::randn({b, h, t, d});
  at::Tensor q1 = q0.clone().requires_grad_(true), k1 = k0.clone().requires_grad_(true),
             v1 = v0.clone().requires_grad_(true);
  at::Tensor q2 = q0.clone().requires_grad_(true), k2 = k0.clone().requires_grad_(true),
             v2 = v0.clone().requires_grad_(true);
  const at::Tensor o1 = cpu_matmul(at::softmax(cpu_matmul(q1, k1.transpose(-2, -1)), -1), v1);
  const at::Tensor o2 = at::matmul(at::softmax(at::matmul(q2, k2.transpose(-2, -1)), -1), v2);
  EXPECT_LT(rel_err(o1, o2), 1e-5);
  (o1 * g0).sum().backward();
  (o2 * g0).sum().backward();
  EXPECT_LT(rel_err(q1.grad(), q2.grad()), 1e-5);
  EXPECT_LT(rel_err(k1.grad(), k2.grad()), 1e-5);
  EXPECT_LT(rel_err(v1.grad(), v2.grad()), 1e-5);
  torch::NoGradGuard no_grad;
  // A permuted operand ([b, s, h, d] read as [b, h, d, s]) is copied first; one-row matrices.
  const at::Tensor kp = at::randn({b, s, h, d}).permute({0, 2, 3, 1});
  EXPECT_LT(rel_err(cpu_matmul(q0, kp), at::matmul(q0, kp)), 1e-5);
  const at::Tensor row = at::randn({b, h, 1, d});
  EXPECT_LT(rel_err(cpu_matmul(row, k0.transpose(-2, -1)), at::matmul(row, k0.transpose(-2, -1))), 1e-5);
  // Broadcast batch dims go to at::matmul.
  const at::Tensor shared = at::randn({1, h, d, s});
  EXPECT_TRUE(at::equal(cpu_matmul(q0, shared), at::matmul(q0, shared)));
}

TEST(CpuGemm, OtherDtypesAutocastAndSingleRowsKeepAtLinear) {
  torch::manual_seed(3);
  const at::Tensor x = at::randn({5, 64}), w = at::randn({96, 64});
  // bf16 stays LibTorch's (oneDNN through at::linear): identical results.
  const at::Tensor xb = x.to(at::kBFloat16), wb = w.to(at::kBFloat16);
  EXPECT_TRUE(at::equal(cpu_linear(xb, wb), at::linear(xb, wb)));
  // Under CPU autocast the fp32 inputs go to at::linear, which runs them in bf16.
  compat::set_autocast(at::kCPU, true, at::kBFloat16);
  const at::Tensor ya = cpu_linear(x, w), yr = at::linear(x, w);
  compat::set_autocast(at::kCPU, false, at::kBFloat16);
  EXPECT_EQ(ya.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(ya, yr));
  // One row: linear_rows' matrix-vector product.
  const at::Tensor row = at::randn({1, 64});
  EXPECT_TRUE(at::equal(linear_rows(row, w), at::mv(w, row.reshape({-1})).view({1, 96})));
}

}  // namespace
// The bf16 single-row product of a bf16 model's decode step: the exact products of the bf16
// inputs summed in fp32, then rounded to bf16 once (within one bf16 rounding of the double
// reference, never the several of partial sums rounded to bf16), for widths that are not multiples
// of 16 and row counts that are not of 4; linear_rows takes it for a bf16 row outside autograd.
TEST(CpuGemm, Bf16RowProductSumsInFp32AndRoundsOnce) {
  torch::manual_seed(5);
  for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{{4096, 512}, {37, 29}, {5, 16}, {3, 1000}}) {
    const at::Tensor w = at::randn({n, k}).to(at::kBFloat16), x = at::randn({1, k}).to(at::kBFloat16);
    const at::Tensor want = at::mv(w.to(at::kDouble), x.to(at::kDouble).view({-1}));
    const at::Tensor got = cpu_bf16_gemv(x, w);
    ASSERT_EQ(got.scalar_type(), at::kBFloat16);
    ASSERT_EQ(got.sizes(), (std::vector<int64_t>{1, n}));
    EXPECT_EQ(beyond_one_bf16_rounding(got, want, k), 0) << n << "x" << k;
    {
      at::NoGradGuard no_grad;
      EXPECT_TRUE(at::equal(linear_rows(x, w), got)) << n << "x" << k;
    }
    EXPECT_LT(rel_err(got, at::linear(x, w)), 1e-2) << "oneDNN's bf16 product, " << n << "x" << k;
  }
}

// Packed weights (serve.cpu_packed_weights): off by default; when on, inference products of up to
// 64 rows read a copy of the weight packed once (more rows: the unpacked paths, checked too). fp32
// equals the unpacked sgemm to fp32 rounding: through our panel kernel (AVX-512) each row's result
// is also that of the row alone, bit for bit; through oneDNN's packed sgemm the results are
// bit-identical from 32 rows up, where both run the same kernels. bf16 sums the exact products in
// fp32 and rounds once (within one bf16 rounding of a double reference). A weight changed in place is packed again; turning packing off frees the packs;
// products that need gradients never use them.
TEST(CpuGemm, PackedWeightsMatchTheUnpackedProducts) {
  if (!cpu_packed_weights_available(at::kFloat) || !cpu_packed_weights_available(at::kBFloat16))
    GTEST_SKIP() << "no oneDNN packed GEMM in this process (PyTorch's own builds, ANDYLLM_CPU_GEMM=blas)";
  torch::manual_seed(11);
  struct Off {
    ~Off() { set_cpu_packed_weights(false); }
  } off;
  at::NoGradGuard no_grad;
  for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{{704, 512}, {37, 29}, {2048, 128}, {5, 1000}}) {
    const at::Tensor w = at::randn({n, k}), wb = w.to(at::kBFloat16);
    for (int64_t m : {1, 2, 7, 32, 33, 160}) {
      const at::Tensor x = at::randn({m, k}), xb = x.to(at::kBFloat16);
      set_cpu_packed_weights(false);
      const at::Tensor want = cpu_linear(x, w);
      EXPECT_EQ(cpu_packed_weight_bytes(), 0);
      set_cpu_packed_weights(true);
      const at::Tensor got = cpu_linear(x, w);
      EXPECT_LT(rel_err(got, want), 2e-6) << n << "x" << k << ", " << m << " rows";
      if (m <= 64 && panel_gemm_available()) {
        // Our panel kernel: each row's sums do not depend on the other rows.
        EXPECT_TRUE(at::equal(got.narrow(0, m - 1, 1), cpu_linear(x.narrow(0, m - 1, 1), w)))
            << n << "x" << k << ", " << m << " rows";
      } else if (m >= 32) {  // oneDNN's packed and unpacked sgemm run the same kernels
        EXPECT_TRUE(at::equal(got, want)) << n << "x" << k << ", " << m << " rows";
      }
      const at::Tensor gotb = cpu_linear(xb.view({1, m, k}), wb);
      ASSERT_EQ(gotb.scalar_type(), at::kBFloat16);
      ASSERT_EQ(gotb.sizes(), (std::vector<int64_t>{1, m, n}));
      const at::Tensor ref = at::matmul(xb.to(at::kDouble), wb.to(at::kDouble).t());
      EXPECT_EQ(beyond_one_bf16_rounding(gotb, ref, k), 0) << n << "x" << k << ", " << m << " rows";
      if (m <= 64) {
        EXPECT_GE(cpu_packed_weight_bytes(), 2 * n * k * 2) << m << " rows";  // the fp32 and the bf16 pack at least
      } else {
        EXPECT_EQ(cpu_packed_weight_bytes(), 0) << m << " rows";
      }
    }
  }
  // Changed in place: packed again.
  at::Tensor w = at::randn({64, 48});
  const at::Tensor x = at::randn({8, 48});
  set_cpu_packed_weights(true);
  const at::Tensor before = cpu_linear(x, w);
  w.mul_(-2);
  set_cpu_packed_weights(false);
  const at::Tensor want = cpu_linear(x, w);
  set_cpu_packed_weights(true);
  cpu_linear(x, w.mul(1));  // another tensor: its own pack
  EXPECT_LT(rel_err(cpu_linear(x, w), want), 2e-6);
  EXPECT_GT(rel_err(before, want), 1.0);
  // Gradients: the autograd path, never the pack.
  {
    at::AutoGradMode grad(true);
    const at::Tensor wg = w.clone().requires_grad_(true);
    at::Tensor y = cpu_linear(x, wg);
    ASSERT_TRUE(y.requires_grad());
    y.sum().backward();
    EXPECT_TRUE(at::allclose(wg.grad(), x.sum(0).expand({64, 48}), 1e-5, 1e-5));
  }
  // Freed weights drop their packs at the next packing.
  set_cpu_packed_weights(false);
  set_cpu_packed_weights(true);
  {
    const at::Tensor tmp = at::randn({256, 256});
    cpu_linear(x.new_ones({4, 256}), tmp);
    EXPECT_GE(cpu_packed_weight_bytes(), 256 * 256 * 4);
  }
  EXPECT_EQ(cpu_packed_weight_bytes(), 0);
}

// The panel kernel itself (cpu_panel_gemm.h) against a double reference: row counts around its
// 12-row passes, column counts around its 32-column panels (the last one partial), odd and
// single-element depths, leading dimensions wider than the rows, one and two threads. Every row
// equals its product alone, bit for bit, and columns beyond n are not written.
TEST(CpuGemm, PanelKernelMatchesADoubleReference) {
  if (!panel_gemm_available()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(5);
  const int threads = at::get_num_threads();
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{
             {1, 1}, {5, 3}, {16, 7}, {17, 64}, {31, 128}, {32, 33}, {33, 128}, {100, 257}, {2048, 128}}) {
      const at::Tensor w = at::randn({n, k});
      std::vector<float> packed(static_cast<size_t>(panel_gemm_packed_size(n, k)) + 16);
      float* aligned = packed.data() + (16 - reinterpret_cast<uintptr_t>(packed.data()) / 4 % 16) % 16;
      panel_gemm_pack(w.data_ptr<float>(), n, k, aligned);
      for (int64_t m : {1, 2, 11, 12, 13, 24, 25, 64}) {
        const int64_t lda = k + 3, ldy = n + 5;
        const at::Tensor xs = at::randn({m, lda}), x = xs.narrow(1, 0, k);
        at::Tensor ys = at::full({m, ldy}, 7.0f);
        panel_gemm(xs.data_ptr<float>(), m, k, lda, aligned, n, ys.data_ptr<float>(), ldy);
        const at::Tensor want = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
        const std::string what = c10::str(m, " x ", k, " x ", n, ", ", t, " thread(s)");
        const double bound = 1e-6 * std::sqrt(static_cast<double>(k)) * 4;
        EXPECT_LT(rel_err(ys.narrow(1, 0, n), want), bound) << what;
        EXPECT_TRUE(ys.narrow(1, n, 5).eq(7.0f).all().item<bool>()) << what << ": wrote beyond n";
        at::Tensor one = at::empty({1, n});
        panel_gemm(xs.data_ptr<float>() + (m - 1) * lda, 1, k, lda, aligned, n, one.data_ptr<float>(), n);
        EXPECT_TRUE(at::equal(one, ys.narrow(0, m - 1, 1).narrow(1, 0, n))) << what << ": the last row alone";
      }
    }
  }
  at::set_num_threads(threads);
}

}  // namespace andy
