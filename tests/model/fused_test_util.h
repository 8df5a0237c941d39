// Shared by the fused-op tests (test_fused_ops.cpp on the CPU, test_fused_ops_gpu.cpp on CUDA):
// a fused path's value and gradients against the composite it replaces.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/fused_ops.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace andy::fused_test {

// Relative max error of a against b (by b's largest magnitude), on the host in double.
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor af = a.to(at::kDouble).cpu(), bf = b.to(at::kDouble).cpu();
  return (af - bf).abs().max().item<double>() / std::max(1e-12, bf.abs().max().item<double>());
}

// Runs f on leaf copies of the inputs, backward with a fixed upstream gradient; returns the
// output followed by each input's gradient.
template <typename F>
std::vector<at::Tensor> value_and_grads(F f, const std::vector<at::Tensor>& inputs, const at::Tensor& upstream) {
  std::vector<at::Tensor> leaves;
  for (const auto& t : inputs) leaves.push_back(t.detach().clone().requires_grad_(true));
  at::Tensor out = f(leaves);
  (out.to(at::kFloat) * upstream).sum().backward();
  std::vector<at::Tensor> r{out.detach()};
  for (const auto& l : leaves) r.push_back(l.grad());
  return r;
}

// Same sizes and dtypes, and every tensor within `tol` (rel_err) of the reference.
inline void expect_close(const std::vector<at::Tensor>& fused, const std::vector<at::Tensor>& ref, double tol,
                         const std::string& what) {
  ASSERT_EQ(fused.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_TRUE(fused[i].defined() && ref[i].defined()) << what << " #" << i;
    ASSERT_EQ(fused[i].sizes(), ref[i].sizes()) << what << " #" << i;
    EXPECT_EQ(fused[i].scalar_type(), ref[i].scalar_type()) << what << " #" << i;
    EXPECT_LT(rel_err(fused[i], ref[i]), tol) << what << (i == 0 ? " value" : " grad #" + std::to_string(i));
  }
}

// The AdamW hyper-parameters of the tests' step `step` (lr 1e-2, betas 0.9 / 0.95).
inline AdamWHyper adamw_hyper(int step, double weight_decay, double grad_scale) {
  AdamWHyper h;
  h.lr = 1e-2;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = weight_decay;
  h.bc1 = 1 - std::pow(0.9, step);
  h.bc2 = 1 - std::pow(0.95, step);
  h.grad_scale = grad_scale;
  return h;
}

}  // namespace andy::fused_test
