// Multi-rank tensor-parallel tests (ctest runs them under mpirun -np 2 and -np 4; the whole
// world is one TP group). Every rank also builds the TP=1 model from the same seed and
// compares: initial shards, logits, loss and every gradient after merging the shards, the
// vocab-parallel cross-entropy against the dense one, and KV-cache decoding.
#include <gtest/gtest.h>
#include <mpi.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <limits>
#include <vector>

#include "core/base/error.h"
#include "core/model/llama.h"
#include "parallel/mpi_communicator.h"
#include "parallel/tp_cross_entropy.h"
#include "parallel/tp_ops.h"
#include "parallel/tp_partition.h"
#include "tests/model/model_test_util.h"

using namespace andy;
using andy::test::report;
using andy::test::tiny_config;

namespace {

CommPtr world_tp() {
  // Deliberately leaked: it must not be destroyed after MPI_Finalize (at static destruction).
  static CommPtr* comm = new CommPtr(std::make_shared<MpiCommunicator>(
      MpiComm(MPI_COMM_WORLD, false), "tp[test]", std::chrono::milliseconds(120000)));
  return *comm;
}

// TP groups of two adjacent ranks (the ProcessGrid layout for tp = 2 with dp = world / 2).
CommPtr pair_tp() {
  static CommPtr* comm = [] {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MpiComm group = MpiComm(MPI_COMM_WORLD, false).split(rank / 2, rank);
    return new CommPtr(
        std::make_shared<MpiCommunicator>(group, "tp[pair]", std::chrono::milliseconds(120000)));
  }();
  return *comm;
}

std::string tag(const std::string& what, const CommPtr& tp = world_tp()) {
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  return "[rank " + std::to_string(world_rank) + " tp " + std::to_string(tp->rank()) + "/" +
         std::to_string(tp->size()) + "] " + what;
}

// The largest relative error over every rank (so all ranks agree on pass/fail).
double max_over_ranks(double x) {
  double out = 0;
  MPI_Allreduce(&x, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

void check_tp_matches_tp1(const ModelConfig& m, const std::string& name, CommPtr tp = world_tp()) {
  const uint64_t seed = 1234;
  LlamaForCausalLM ref(m, nullptr, seed);
  LlamaForCausalLM par(m, tp, seed);
  const int tp_size = tp->size(), rank = tp->rank();

  // 1. Initialisation: the TP shards of the seed-initialised TP=1 model are this model's.
  StateDict expect =
      split_state_dict(ref->full_state_dict(), par->partition_specs(), rank, tp_size);
  double init_diff = 0;
  for (const auto& [n, t] : par->local_state_dict()) {
    ASSERT_EQ(t.sizes(), expect.at(n).sizes()) << n;
    init_diff = std::max(init_diff, andy::test::max_abs(t - expect.at(n)));
  }
  std::printf("  %-60s max|diff| = %.3e\n", tag(name + ": init shards vs TP=1 split", tp).c_str(),
              init_diff);
  EXPECT_EQ(max_over_ranks(init_diff), 0.0);

  // 2. Logits and loss (targets include ignored positions).
  at::Tensor tokens = andy::test::random_tokens(2, 16, m.vocab_size, 42);
  at::Tensor targets = andy::test::random_tokens(2, 16, m.vocab_size, 43);
  targets.index_put_({0, at::arange(0, 16, 3)}, -100);
  at::Tensor ref_logits = ref->forward(tokens);
  at::Tensor ref_loss = ref->loss(ref_logits, targets);
  ref_loss.backward();
  at::Tensor logits = par->forward(tokens);
  at::Tensor loss = par->loss(logits, targets);
  loss.backward();
  const int64_t local = par->padded_vocab() / tp_size;
  double e_logits = report(tag(name + ": local logits vs TP=1", tp), logits,
                           ref_logits.narrow(-1, par->vocab_start(), local));
  double e_loss = report(tag(name + ": loss vs TP=1", tp), loss, ref_loss);
  // Full logits gathered over TP (the sampling path).
  at::Tensor gathered = par->gather_logits(logits.detach());
  double e_gather = report(tag(name + ": gathered logits vs TP=1", tp), gathered,
                           ref->gather_logits(ref_logits.detach()));
  EXPECT_LT(max_over_ranks(e_logits), 1e-5);
  EXPECT_LT(max_over_ranks(e_loss), 1e-5);
  EXPECT_LT(max_over_ranks(e_gather), 1e-5);

  // 3. Every gradient, merged over TP, against TP=1.
  StateDict grads = gather_full_state_dict(par->local_grads(), par->partition_specs(), tp);
  StateDict ref_grads = gather_full_state_dict(ref->local_grads(), ref->partition_specs(), nullptr);
  ASSERT_EQ(grads.size(), ref_grads.size());
  double worst = 0;
  std::string worst_name;
  for (const auto& [n, g] : ref_grads) {
    ASSERT_GT(andy::test::max_abs(g), 0.0) << n << " has no gradient";
    double e = andy::test::rel_err(grads.at(n), g);
    if (e > worst) worst = e, worst_name = n;
  }
  std::printf("  %-60s worst rel = %.3e (%s)\n",
              tag(name + ": all " + std::to_string(grads.size()) + " grads vs TP=1", tp).c_str(),
              worst, worst_name.c_str());
  EXPECT_LT(max_over_ranks(worst), 1e-5) << worst_name;

  // 4. Replicated parameters have the same gradient on every rank (what grad clipping assumes).
  for (const auto& info : par->param_infos()) {
    if (info.tp_sharded()) continue;
    at::Tensor g = info.param.grad().clone();
    at::Tensor mx = g.clone(), mn = g.clone();
    tp->all_reduce_sync(mx, ReduceOp::kMax);
    tp->all_reduce_sync(mn, ReduceOp::kMin);
    EXPECT_EQ(andy::test::max_abs(mx - mn), 0.0) << info.name;
  }
}

}  // namespace

TEST(TensorParallel, GqaUntiedMatchesTp1) {
  check_tp_matches_tp1(tiny_config(false, 4), "gqa untied");
}
TEST(TensorParallel, GqaTiedMatchesTp1) { check_tp_matches_tp1(tiny_config(true, 4), "gqa tied"); }
TEST(TensorParallel, MhaTiedMatchesTp1) { check_tp_matches_tp1(tiny_config(true, 8), "mha tied"); }
TEST(TensorParallel, OddVocabMatchesTp1) {
  ModelConfig m = tiny_config(false, 4);
  m.vocab_size = 97;  // the last rank's slice is mostly padding
  check_tp_matches_tp1(m, "gqa untied vocab 97");
}

// With world 4 the model is split over two TP groups of two ranks each (as with dp = 2); with
// world 2 this is the whole world again.
TEST(TensorParallel, TpSubgroupsMatchTp1) {
  check_tp_matches_tp1(tiny_config(false, 4), "gqa untied, tp pairs", pair_tp());
}

TEST(TensorParallel, VocabParallelCrossEntropyMatchesDense) {
  CommPtr tp = world_tp();
  const int64_t n = 40, vocab = 97, padded = 128, local = padded / tp->size();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::Tensor logits = at::randn({n, padded}, gen).mul(4.0);
  at::Tensor targets = at::randint(vocab, {n}, gen, at::TensorOptions().dtype(at::kLong));
  targets.index_put_({at::arange(1, n, 4)}, -100);
  at::Tensor weights = at::rand({n}, gen);
  at::Tensor dense = logits.narrow(1, 0, vocab).clone().requires_grad_(true);
  at::Tensor ref = at::cross_entropy_loss(dense, targets, {}, at::Reduction::None, -100);
  (ref * weights).sum().backward();
  const int64_t start = tp->rank() * local;
  at::Tensor mine = logits.narrow(1, start, local).clone().requires_grad_(true);
  at::Tensor loss = vocab_parallel_cross_entropy(mine, targets, tp, start, vocab, -100);
  (loss * weights).sum().backward();
  at::Tensor grad = gather_from_tp_region(mine.grad(), tp);
  double e_loss = report(tag("vocab-parallel CE loss vs dense"), loss, ref);
  double e_grad =
      report(tag("vocab-parallel CE grad vs dense"), grad.narrow(1, 0, vocab), dense.grad());
  EXPECT_LT(max_over_ranks(e_loss), 1e-6);
  EXPECT_LT(max_over_ranks(e_grad), 1e-6);
  EXPECT_EQ(andy::test::max_abs(grad.narrow(1, vocab, padded - vocab)), 0.0);
  EXPECT_EQ(andy::test::max_abs(loss.index({at::arange(1, n, 4)})), 0.0);
}

// The greedy tokens reduced on the ranks (each its slice's maximum, rank 0 the largest) equal the
// first argmax of the full row: ties within a slice and across slices, the last valid id, rows of
// -inf, a vocabulary padded to the TP size (padding holds the largest values and must be
// ignored), and a NaN on one rank refused on rank 0.
TEST(TensorParallel, GreedyTokensToRootMatchFullArgmax) {
  CommPtr tp = world_tp();
  ModelConfig m = tiny_config(false, 4);
  m.vocab_size = 97;
  LlamaForCausalLM model(m, tp, 5);
  at::Tensor local_shape;
  {
    at::NoGradGuard g;
    local_shape = model->forward(andy::test::random_tokens(1, 1, m.vocab_size, 3));
  }
  const int64_t local = local_shape.size(-1), padded = local * tp->size(), v = m.vocab_size;
  ASSERT_GT(padded, v) << "the test wants padding";
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(9);
  at::Tensor full = at::randn({8, padded}, gen);
  const float inf = std::numeric_limits<float>::infinity();
  full.narrow(1, v, padded - v).fill_(1e9);  // padding: never a token
  full[1][3] = 50;
  full[1][v - 2] = 50;  // a tie across slices: the lower id
  full[2][10] = 7;
  full[2][11] = 7;  // a tie within a slice
  full[3][v - 1] = 60;  // the last valid id
  full[4].narrow(0, 0, v).fill_(-inf);  // all -inf: id 0, as the sampler's argmax
  full[5][local] = 30;  // the first id of rank 1's slice
  std::vector<int64_t> want;
  for (int64_t r = 0; r < full.size(0); ++r) {
    int64_t best = 0;
    for (int64_t i = 1; i < v; ++i)
      if (full[r][i].item<float>() > full[r][best].item<float>()) best = i;
    want.push_back(best);
  }
  const at::Tensor mine = full.narrow(1, tp->rank() * local, local).contiguous();
  const std::vector<int64_t> got = model->greedy_tokens_to_root(mine);
  if (tp->rank() == 0)
    EXPECT_EQ(got, want);
  else
    EXPECT_TRUE(got.empty());
  // A NaN in the last rank's slice (a valid id there): rank 0 refuses the step.
  at::Tensor with_nan = full.clone();
  with_nan[6][std::min(v - 1, (tp->size() - 1) * local)] = std::numeric_limits<float>::quiet_NaN();
  const at::Tensor mine_nan = with_nan.narrow(1, tp->rank() * local, local).contiguous();
  if (tp->rank() == 0)
    EXPECT_THROW(model->greedy_tokens_to_root(mine_nan), Error);
  else
    EXPECT_TRUE(model->greedy_tokens_to_root(mine_nan).empty());
}

// Without gradients the TP layers take their inference forms: the vocab-parallel embedding's
// one-pass lookup (ids in every rank's slice, in the padding and beyond it), and the row-parallel
// sum taken in the product's own storage. Both equal the autograd forms exactly, and the
// row-parallel layer leaves its input alone.
TEST(TensorParallel, InferencePathsEqualAutogradPaths) {
  CommPtr tp = world_tp();
  const int64_t vocab = 97, padded = 100, dim = 24;
  VocabParallelEmbedding emb(VocabParallelEmbeddingOptions(vocab, padded, dim, tp).seed(11));
  std::vector<int64_t> id_list;
  for (int64_t i = 0; i < padded + 3; ++i) id_list.push_back((i * 37) % (padded + 3));
  const at::Tensor ids = at::tensor(id_list, at::kLong).view({1, -1});
  const at::Tensor with_grad = emb->forward(ids);
  ASSERT_TRUE(with_grad.requires_grad());
  at::NoGradGuard no_grad;
  const at::Tensor inference = emb->forward(ids);
  EXPECT_TRUE(at::equal(inference, with_grad.detach())) << tag("embedding");
  EXPECT_TRUE(at::equal(inference[0][0], emb->forward(at::tensor({id_list[0]}, at::kLong))[0])) << tag("1-d ids");

  const int64_t in = 8 * tp->size(), out = 12;
  RowParallelLinear row(RowParallelLinearOptions(in, out, tp).seed(5));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(100 + tp->rank());
  const at::Tensor x = at::randn({5, in / tp->size()}, gen), x_before = x.clone();
  at::Tensor row_grad;
  {
    at::AutoGradMode grad(true);
    row_grad = row->forward(x);
    ASSERT_TRUE(row_grad.requires_grad());
  }
  EXPECT_TRUE(at::equal(row->forward(x), row_grad.detach())) << tag("row-parallel linear");
  EXPECT_TRUE(at::equal(x, x_before));
}

TEST(TensorParallel, KvCacheDecodingMatchesFullForward) {
  CommPtr tp = world_tp();
  ModelConfig m = tiny_config(false, 4);
  LlamaForCausalLM model(m, tp, 77);
  at::Tensor tokens = andy::test::random_tokens(2, 10, m.vocab_size, 8);
  at::Tensor full;
  {
    at::NoGradGuard g;
    full = model->forward(tokens);
  }
  KvCache cache(m, tp->size(), /*block_size=*/3, /*num_blocks=*/10);
  std::vector<KvSequence> seqs(2);
  cache.reserve(seqs[0], 4);
  cache.reserve(seqs[1], 4);
  std::vector<at::Tensor> got{model->forward_cached(tokens.narrow(1, 0, 4), cache, seqs)};
  for (int64_t p = 4; p < 10; ++p) {
    cache.reserve(seqs[0], 1);
    cache.reserve(seqs[1], 1);
    got.push_back(model->forward_cached(tokens.narrow(1, p, 1), cache, seqs));
  }
  double e = report(tag("KV-cache decode vs full forward (local logits)"), at::cat(got, 1), full);
  EXPECT_LT(max_over_ranks(e), 1e-5);
  // And against the TP=1 model's full forward (same seed).
  LlamaForCausalLM ref(m, nullptr, 77);
  at::NoGradGuard g;
  at::Tensor ref_full = ref->forward(tokens);
  double e1 = report(tag("KV-cache decode vs TP=1 full forward"),
                     model->gather_logits(at::cat(got, 1)), ref->gather_logits(ref_full));
  EXPECT_LT(max_over_ranks(e1), 1e-5);
}

TEST(TensorParallel, GatherFullStateDictRoundTrip) {
  CommPtr tp = world_tp();
  ModelConfig m = tiny_config(true, 4);
  m.vocab_size = 101;
  LlamaForCausalLM a(m, tp, 3);
  StateDict full = a->full_state_dict();
  EXPECT_EQ(full.at("model.embed_tokens.weight").size(0), 101);
  LlamaForCausalLM b(m, tp, 999);  // different seed, then loaded
  b->load_full_state_dict(full);
  double worst = 0;
  for (const auto& [n, t] : a->local_state_dict())
    worst = std::max(worst, andy::test::max_abs(t - b->local_state_dict().at(n)));
  std::printf("  %-60s max|diff| = %.3e\n",
              tag("load_full_state_dict(full_state_dict()) shards").c_str(), worst);
  EXPECT_EQ(max_over_ranks(worst), 0.0);
}
