// Int8 weights and the dynamic int8 linear kernel (parallel/int8_linear.h,
// core/model/int8_weights.h): the kernel against the exact integer formula written here, against
// fp32, with and without the AVX2 path's 32-value tail, independent of the batch; per-channel
// quantization round-trips within half a step; scales are partitioned with their rows.
#include <gtest/gtest.h>

#include "core/model/int8_weights.h"
#include "parallel/int8_linear.h"

namespace {

using andy::Int8Linear;

// y = (sum qx*qw) * sx * sw, summed in int64 here: the kernel's int32 sums must be exact.
at::Tensor reference(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  auto [xq, xs] = andy::quantize_rows_int8(x);
  at::Tensor dots = at::matmul(xq.to(at::kLong), q.to(at::kLong).t());
  at::Tensor y = at::empty({x.size(0), q.size(0)}, at::kFloat);
  for (int64_t m = 0; m < x.size(0); ++m)
    for (int64_t n = 0; n < q.size(0); ++n)
      y[m][n] = static_cast<float>(dots[m][n].item<int64_t>()) * xs[m].item<float>() * scale[n].item<float>();
  return y;
}

TEST(Int8Linear, EqualsTheExactIntegerFormulaForAnyWidthAndBatch) {
  at::manual_seed(1);
  for (int64_t k : {32, 40, 512, 77}) {     // multiples of 32 and tails
    for (int64_t m : {1, 3, 4, 9}) {        // full and partial blocks of 4 rows
      at::Tensor w = at::randn({37, k}) * 0.05;
      auto q = andy::quantize_per_channel(w);
      at::Tensor x = at::randn({m, k});
      Int8Linear lin(q.q, q.scale);
      at::Tensor y = lin.forward(x);
      EXPECT_TRUE(y.equal(reference(x, q.q, q.scale))) << "k " << k << " m " << m;
      // Close to the fp32 product: a few percent of its scale at most.
      at::Tensor f = at::linear(x, w);
      const double rel = ((y - f).abs().max() / f.abs().max()).item<double>();
      EXPECT_LT(rel, 0.03) << "k " << k << " m " << m;
      std::printf("k %3lld m %lld: largest difference from fp32 %.4f of its range\n",
                  static_cast<long long>(k), static_cast<long long>(m), rel);
    }
  }
}

TEST(Int8Linear, ARowsOutputDoesNotDependOnTheOtherRows) {
  at::manual_seed(2);
  at::Tensor w = at::randn({64, 96});
  auto q = andy::quantize_per_channel(w);
  Int8Linear lin(q.q, q.scale);
  at::Tensor x = at::randn({7, 96});
  x[3] *= 100;  // a row with a much larger range: per-token scales keep the others unchanged
  at::Tensor batched = lin.forward(x);
  for (int64_t m = 0; m < 7; ++m) EXPECT_TRUE(lin.forward(x[m].unsqueeze(0))[0].equal(batched[m])) << m;
  // Leading dims are kept.
  EXPECT_EQ(lin.forward(at::randn({2, 3, 96})).sizes(), (std::vector<int64_t>{2, 3, 64}));
}

TEST(Int8Weights, PerChannelQuantizationIsWithinHalfAStep) {
  at::manual_seed(3);
  at::Tensor w = at::randn({16, 50});
  w[5].zero_();
  auto q = andy::quantize_per_channel(w);
  EXPECT_EQ(q.q.scalar_type(), at::kChar);
  EXPECT_LE(q.q.abs().max().item<int>(), 127);
  EXPECT_EQ(q.scale[5].item<float>(), 1.0f) << "an all-zero row gets scale 1";
  at::Tensor back = andy::dequantize_per_channel(q.q, q.scale);
  EXPECT_TRUE(((back - w).abs() <= q.scale.unsqueeze(1) * 0.5 + 1e-7).all().item<bool>());
  // quantize_state_dict: linear weights only, each with its scale; back again.
  andy::StateDict full = {{"model.layers.0.mlp.up_proj.weight", w},
                          {"model.embed_tokens.weight", at::randn({10, 50})},
                          {"model.norm.weight", at::ones({50})}};
  andy::StateDict qd = andy::quantize_state_dict(full);
  EXPECT_EQ(qd.size(), 4u);
  EXPECT_EQ(qd.at("model.layers.0.mlp.up_proj.weight").scalar_type(), at::kChar);
  EXPECT_TRUE(qd.at("model.embed_tokens.weight").equal(full.at("model.embed_tokens.weight")));
  andy::StateDict dq = andy::dequantize_state_dict(qd);
  EXPECT_EQ(dq.size(), 3u);
  EXPECT_TRUE(dq.at("model.layers.0.mlp.up_proj.weight").equal(back));
}

TEST(Int8Weights, ScalesArePartitionedWithTheirRows) {
  andy::PartitionSpecs specs = {{"model.layers.0.self_attn.q_proj.weight", andy::PartitionSpec::split(0, 64)},
                                {"model.layers.0.self_attn.o_proj.weight", andy::PartitionSpec::split(1, 64)},
                                {"lm_head.weight", andy::PartitionSpec::split(0, 100, 128)},
                                {"model.norm.weight", andy::PartitionSpec::replicate()}};
  andy::PartitionSpecs s = andy::with_int8_scales(specs);
  EXPECT_EQ(s.size(), 7u);
  EXPECT_EQ(s.at("model.layers.0.self_attn.q_proj.weight_scale").dim, 0);
  EXPECT_TRUE(s.at("model.layers.0.self_attn.o_proj.weight_scale").replicated());
  EXPECT_EQ(s.at("lm_head.weight_scale").padded_size, 128);
  EXPECT_FALSE(s.count("model.norm.weight_scale"));
}

}  // namespace
