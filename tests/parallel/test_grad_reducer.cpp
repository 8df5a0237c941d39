// Multi-rank tests of GradReducer (run by ctest under mpirun -np 2 and 3): the DP average of
// every parameter's gradient against closed-form values, with gradients handed to autograd as
// bucket views (.grad shares the bucket's memory) and where they cannot be (bf16), gradient
// accumulation over micro-steps, two backward passes before finish(), .grad left over from an
// earlier step, and a parameter that gets no gradient.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "parallel/grad_reducer.h"
#include "tests/mpi_test_main.h"

using namespace andy;

namespace {


// Parameters of a few shapes; with tiny buckets they spread over several buckets.
std::vector<at::Tensor> make_params(at::ScalarType dtype = at::kFloat) {
  std::vector<at::Tensor> ps;
  for (auto shape : {std::vector<int64_t>{3, 4}, {5}, {2, 3, 2}, {7}})
    ps.push_back(at::arange(1, 1 + c10::multiply_integers(shape), at::kFloat).view(shape).to(dtype).requires_grad_());
  return ps;
}

// loss = sum(p * p * c) for each p: dloss/dp = 2 c p. Rank r uses c = r + 1 (and `scale`).
at::Tensor loss_of(const std::vector<at::Tensor>& ps, double c) {
  at::Tensor loss = at::zeros({}, at::kFloat);
  for (const auto& p : ps) loss = loss + (p * p).to(at::kFloat).sum() * c;
  return loss;
}

// The mean over ranks of (r + 1): the DP average of c.
double mean_c(int n) { return (n + 1) / 2.0; }

GradReducerOptions tiny_buckets() { return GradReducerOptions().set_bucket_mb(16.0 / (1 << 20)).set_first_bucket_mb(8.0 / (1 << 20)); }

void expect_grads(const std::vector<at::Tensor>& ps, double factor, const char* what) {
  for (size_t k = 0; k < ps.size(); ++k) {
    ASSERT_TRUE(ps[k].grad().defined()) << what << " param " << k;
    const at::Tensor want = ps[k].detach().to(at::kFloat) * 2.0 * factor;
    EXPECT_TRUE(at::allclose(ps[k].grad().to(at::kFloat), want, 1e-6, 1e-6))
        << what << " param " << k << ": " << ps[k].grad() << " want " << want;
  }
}

// Every test: the world communicator, this rank, and fresh fp32 parameters.
class GradReducerTest : public ::testing::Test {
 protected:
  CommPtr comm = test_world_comm();
  const int n = comm->size(), r = comm->rank();
  std::vector<at::Tensor> ps = make_params();
};

}  // namespace

TEST_F(GradReducerTest, AveragesIntoBucketViews) {
  for (bool one_bucket : {false, true}) {
    ps = make_params();
    GradReducer reducer(ps, comm, one_bucket ? GradReducerOptions() : tiny_buckets());
    for (int step = 0; step < 3; ++step) {
      for (auto& p : ps) p.mutable_grad() = at::Tensor();
      reducer.set_sync(true);
      loss_of(ps, (r + 1) * (step + 1)).backward();
      reducer.finish();
      expect_grads(ps, mean_c(n) * (step + 1), one_bucket ? "one bucket" : "a bucket each");
      // fp32 gradients are the bucket's memory, not tensors of their own: in one bucket, every
      // .grad is a slice of the same storage.
      if (one_bucket) {
        for (auto& p : ps) EXPECT_EQ(p.grad().storage().data(), ps[0].grad().storage().data()) << "step " << step;
      }
    }
    EXPECT_GT(reducer.stats().buckets_launched_in_backward, 0);
  }
}

TEST_F(GradReducerTest, Bf16ParametersKeepGradientsOfTheirOwn) {
  ps = make_params(at::kBFloat16);
  GradReducer reducer(ps, comm, tiny_buckets());
  reducer.set_sync(true);
  loss_of(ps, r + 1).backward();
  reducer.finish();
  for (size_t k = 0; k < ps.size(); ++k) {
    ASSERT_EQ(ps[k].grad().scalar_type(), at::kBFloat16);
    const at::Tensor want = ps[k].detach().to(at::kFloat) * 2.0 * mean_c(n);
    EXPECT_TRUE(at::allclose(ps[k].grad().to(at::kFloat), want, 1e-2, 1e-2)) << "param " << k;
  }
}

TEST_F(GradReducerTest, AccumulatesMicroStepsThenAverages) {
  GradReducer reducer(ps, comm, tiny_buckets());
  for (int step = 0; step < 2; ++step) {
    for (auto& p : ps) p.mutable_grad() = at::Tensor();
    for (int micro = 0; micro < 3; ++micro) {
      reducer.set_sync(micro == 2);
      loss_of(ps, (r + 1) * (micro + 1)).backward();
    }
    reducer.finish();
    expect_grads(ps, mean_c(n) * 6, "accumulated");  // c * (1 + 2 + 3)
  }
}

TEST_F(GradReducerTest, TwoBackwardsBeforeFinishSumThenAverage) {
  GradReducer reducer(ps, comm, tiny_buckets());
  for (int step = 0; step < 2; ++step) {
    for (auto& p : ps) p.mutable_grad() = at::Tensor();
    reducer.set_sync(true);
    loss_of(ps, r + 1).backward();
    loss_of(ps, 3.0 * (r + 1)).backward();  // every parameter gets a second gradient
    reducer.finish();
    expect_grads(ps, mean_c(n) * 4, "two backwards");
  }
}

TEST_F(GradReducerTest, GradientsLeftFromAnEarlierStepAddUp) {
  // Without resetting .grad, the second step reduces (the first average + the new gradients),
  // as LibTorch's accumulation into .grad would: avg(c) + avg(2c).
  GradReducer reducer(ps, comm, tiny_buckets());
  reducer.set_sync(true);
  loss_of(ps, r + 1).backward();
  reducer.finish();
  expect_grads(ps, mean_c(n), "first step");
  reducer.set_sync(true);
  loss_of(ps, 2.0 * (r + 1)).backward();
  reducer.finish();
  expect_grads(ps, mean_c(n) * 3, "second step, .grad kept");
}

TEST_F(GradReducerTest, ParameterWithoutGradientGetsZeros) {
  GradReducer reducer(ps, comm, tiny_buckets());
  std::vector<at::Tensor> used(ps.begin(), ps.end() - 1);
  reducer.set_sync(true);
  loss_of(used, r + 1).backward();
  reducer.finish();
  expect_grads(used, mean_c(n), "used");
  ASSERT_TRUE(ps.back().grad().defined());
  EXPECT_EQ(ps.back().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(reducer.stats().buckets_launched_in_finish, 0);
}
