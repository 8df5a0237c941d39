// oneDNN sgemm for fp32 CPU linears (see cpu_gemm.h).
#include "parallel/cpu_gemm.h"
#include "parallel/cpu_panel_gemm.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <torch/torch.h>

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/base/avx2_math.h"
#include "core/base/error.h"
#include "core/base/torch_compat.h"

namespace andy {

namespace {

// oneDNN's C API (dnnl.h, oneDNN 2.x and 3.x): row-major sgemm; 0 is dnnl_success.
using SgemmFn = int (*)(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// ANDYLLM_CPU_GEMM=blas: every fp32 product through at::linear / at::matmul (OpenBLAS), none of
// ours or oneDNN's.
bool blas_requested() {
  static const bool yes = [] {
    const char* env = std::getenv("ANDYLLM_CPU_GEMM");
    return env && std::string(env) == "blas";
  }();
  return yes;
}

// The process's `dnnl_sgemm` (Debian's libtorch_cpu links libdnnl.so.2; PyTorch's own builds link
// oneDNN statically and do not export it), or null.
SgemmFn sgemm_fn() {
  static const SgemmFn fn = [] {
    if (blas_requested()) return SgemmFn{nullptr};
    return reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "dnnl_sgemm"));
  }();
  return fn;
}

// oneDNN's packed GEMM (src/cpu/gemm/gemm_pack.hpp, oneDNN 2.x; exported by libdnnl.so.2 as C++
// symbols, not by dnnl.h): one operand is packed once into the layout the kernels read, and the
// products then skip the per-call copy of it. Column-major, as BLAS; dim_t is int64_t.
using PackSizeFn = int (*)(const char* identifier, const char* transa, const char* transb, const int64_t* m,
                           const int64_t* n, const int64_t* k, const int64_t* lda, const int64_t* ldb, size_t* size,
                           bool* pack);
template <typename T>
using PackFn = int (*)(const char* identifier, const char* transa, const char* transb, const int64_t* m,
                       const int64_t* n, const int64_t* k, const int64_t* lda, const int64_t* ldb, const T* src, T* dst);
template <typename T>
using ComputeFn = int (*)(const char* transa, const char* transb, const int64_t* m, const int64_t* n, const int64_t* k,
                          const T* a, const int64_t* lda, const T* b, const int64_t* ldb, const float* beta, float* c,
                          const int64_t* ldc);

// The packed-GEMM entry points of one element type (float, or bf16 as uint16_t), or nulls.
template <typename T>
struct PackedGemm {
  PackSizeFn size = nullptr;
  PackFn<T> pack = nullptr;
  ComputeFn<T> compute = nullptr;
  bool available() const { return size && pack && compute; }
};

template <typename T>
PackedGemm<T> lookup_packed_gemm(const char* size_name, const char* pack_name, const char* compute_name) {
  PackedGemm<T> g;
  if (blas_requested()) return g;
  g.size = reinterpret_cast<PackSizeFn>(dlsym(RTLD_DEFAULT, size_name));
  g.pack = reinterpret_cast<PackFn<T>>(dlsym(RTLD_DEFAULT, pack_name));
  g.compute = reinterpret_cast<ComputeFn<T>>(dlsym(RTLD_DEFAULT, compute_name));
  return g;
}

const PackedGemm<float>& packed_sgemm() {
  static const PackedGemm<float> g = lookup_packed_gemm<float>(
      "_ZN4dnnl4impl3cpu19sgemm_pack_get_sizeEPKcS3_S3_PKlS5_S5_S5_S5_PmPb",
      "_ZN4dnnl4impl3cpu10sgemm_packEPKcS3_S3_PKlS5_S5_S5_S5_PKfPf",
      "_ZN4dnnl4impl3cpu13sgemm_computeEPKcS3_PKlS5_S5_PKfS5_S7_S5_S7_PfS5_");
  return g;
}

const PackedGemm<uint16_t>& packed_bf16_gemm() {
  static const PackedGemm<uint16_t> g = lookup_packed_gemm<uint16_t>(
      "_ZN4dnnl4impl3cpu30gemm_bf16bf16f32_pack_get_sizeEPKcS3_S3_PKlS5_S5_S5_S5_PmPb",
      "_ZN4dnnl4impl3cpu21gemm_bf16bf16f32_packEPKcS3_S3_PKlS5_S5_S5_S5_PKNS0_10bfloat16_tEPS6_",
      "_ZN4dnnl4impl3cpu24gemm_bf16bf16f32_computeEPKcS3_PKlS5_S5_PKNS0_10bfloat16_tES5_S8_S5_PKfPfS5_");
  return g;
}

// Products of more rows (prefill chunks) keep the unpacked paths: with the packs used for them
// too, a 25 M model's prefill at concurrency 1 ran 5-10 % slower in `bench generate` (bf16; the
// single-row decode steps read the unpacked weights, so the two copies compete for the cache),
// and concurrency 32 gained nothing measurable.
constexpr int64_t kPackedMaxRows = 64;

// The weights are packed for this many rows of x; the packed layout serves any row count (checked
// from 1 to 300 rows against at::linear; its size stops depending on the rows from 32 up).
constexpr int64_t kPackRows = 32;

// x [..., K] and w [N, K] on the CPU, neither empty: the shapes every CPU product path takes.
bool cpu_linear_operands(const at::Tensor& x, const at::Tensor& w) {
  return x.device().is_cpu() && w.device().is_cpu() && x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1) &&
         x.numel() > 0 && w.numel() > 0;
}

// One packed weight matrix: W [N, K] row-major seen as column-major op(A) = W (A = W^T, lda = K).
struct PackedWeight {
  explicit PackedWeight(const at::Tensor& w)
      : owner(w.getIntrusivePtr()), data(w.data_ptr()), n(w.size(0)), k(w.size(1)), version(w._version()),
        dtype(w.scalar_type()) {}
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const void* data;
  int64_t n, k, version;
  at::ScalarType dtype;
  std::shared_ptr<void> buffer;  // 64-byte aligned
  int64_t bytes = 0;             // of the packed layout
};

struct PackedWeights {
  std::mutex mu;
  bool enabled = false;
  std::unordered_map<const c10::TensorImpl*, PackedWeight> by_tensor;
};

PackedWeights& packed_weights() {
  static PackedWeights p;
  return p;
}

bool packed_entry_matches(const PackedWeight& e, const at::Tensor& w) {
  return !e.owner.expired() && e.data == w.data_ptr() && e.n == w.size(0) && e.k == w.size(1) &&
         e.version == w._version() && e.dtype == w.scalar_type();
}

// Packs e's weight w into e.buffer.
template <typename T>
void pack_weight(const PackedGemm<T>& g, const at::Tensor& w, PackedWeight& e) {
  const int64_t n = w.size(0), k = w.size(1), m = kPackRows, lda = k, ldb = k;
  size_t bytes = 0;
  bool pack = true;
  int status = g.size("A", "T", "N", &n, &m, &k, &lda, &ldb, &bytes, &pack);
  ANDY_CHECK(status == 0 && pack && bytes > 0, "cpu_linear: oneDNN's pack_get_size failed with status ", status,
             " (N ", n, ", K ", k, ")");
  void* raw = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  ANDY_CHECK(raw, "cpu_linear: out of memory packing a ", n, "x", k, " weight (", bytes, " bytes)");
  e.buffer.reset(raw, std::free);
  e.bytes = static_cast<int64_t>(bytes);
  status = g.pack("A", "T", "N", &n, &m, &k, &lda, &ldb, static_cast<const T*>(w.data_ptr()), static_cast<T*>(raw));
  ANDY_CHECK(status == 0, "cpu_linear: oneDNN's pack failed with status ", status, " (N ", n, ", K ", k, ")");
}

// Packs fp32 w into e.buffer in cpu_panel_gemm.h's panels.
void pack_panels(const at::Tensor& w, PackedWeight& e) {
  const int64_t n = w.size(0), k = w.size(1);
  const size_t bytes = static_cast<size_t>(panel_gemm_packed_size(n, k)) * sizeof(float);
  void* raw = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  ANDY_CHECK(raw, "cpu_linear: out of memory packing a ", n, "x", k, " weight (", bytes, " bytes)");
  e.buffer.reset(raw, std::free);
  e.bytes = static_cast<int64_t>(bytes);
  panel_gemm_pack(w.data_ptr<float>(), n, k, static_cast<float*>(raw));
}

// fp32 weights go to our panel kernel where the CPU runs it (AVX-512), else to oneDNN's.
bool fp32_panels() { return panel_gemm_available() && !blas_requested(); }

// The packed copy of w, packed on first use (and again if w changed in place); null when the
// packing is off or does not apply.
std::shared_ptr<void> packed_for(const at::Tensor& w) {
  PackedWeights& p = packed_weights();
  std::lock_guard<std::mutex> lock(p.mu);
  if (!p.enabled) return nullptr;
  auto it = p.by_tensor.find(w.unsafeGetTensorImpl());
  if (it != p.by_tensor.end() && packed_entry_matches(it->second, w)) return it->second.buffer;
  for (auto e = p.by_tensor.begin(); e != p.by_tensor.end();)  // drop the packs of freed weights
    e = e->second.owner.expired() ? p.by_tensor.erase(e) : std::next(e);
  PackedWeight e(w);
  if (w.scalar_type() == at::kFloat && fp32_panels()) {
    pack_panels(w, e);
  } else if (w.scalar_type() == at::kFloat) {
    pack_weight(packed_sgemm(), w, e);
  } else {
    pack_weight(packed_bf16_gemm(), w, e);
  }
  std::shared_ptr<void> buffer = e.buffer;
  p.by_tensor.insert_or_assign(w.unsafeGetTensorImpl(), std::move(e));
  return buffer;
}

// y = x W^T through W's packed copy: inference (no gradient), CPU, 1 to kPackedMaxRows rows of x,
// fp32 x and W outside autocast, or bf16 x and W (summed in fp32, rounded to bf16 once, as at::linear); false when it does not apply.
bool packed_linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad())) return false;
  if (!(cpu_linear_operands(x, w) && w.is_contiguous() && x.scalar_type() == w.scalar_type())) return false;
  const bool fp32 = x.scalar_type() == at::kFloat && !compat::autocast_enabled(at::kCPU) &&
                    (fp32_panels() || packed_sgemm().available());
  const bool bf16 = x.scalar_type() == at::kBFloat16 && packed_bf16_gemm().available();
  if (!fp32 && !bf16) return false;
  if (x.numel() / w.size(1) > kPackedMaxRows) return false;
  const std::shared_ptr<void> packed = packed_for(w);
  if (!packed) return false;
  const int64_t k = w.size(1), n = w.size(0), m = x.numel() / k, lda = k, ldb = k, ldc = n;
  const float beta = 0;
  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = n;
  if (fp32 && fp32_panels()) {
    panel_gemm(x2.data_ptr<float>(), m, k, k, static_cast<const float*>(packed.get()), n, out.data_ptr<float>(), n);
    y = out.view(shape);
    return true;
  }
  int status = fp32 ? packed_sgemm().compute("P", "N", &n, &m, &k, static_cast<const float*>(packed.get()), &lda,
                                             x2.data_ptr<float>(), &ldb, &beta, out.data_ptr<float>(), &ldc)
                    : packed_bf16_gemm().compute("P", "N", &n, &m, &k, static_cast<const uint16_t*>(packed.get()), &lda,
                                                 static_cast<const uint16_t*>(x2.data_ptr()), &ldb, &beta,
                                                 out.data_ptr<float>(), &ldc);
  ANDY_CHECK(status == 0, "cpu_linear: oneDNN's packed product failed with status ", status, " (M ", m, ", N ", n,
             ", K ", k, ")");
  y = (bf16 ? out.to(at::kBFloat16) : out).view(shape);
  return true;
}

bool applies(const at::Tensor& x, const at::Tensor& w) {
  return cpu_gemm_enabled() && cpu_linear_operands(x, w) && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && !compat::autocast_enabled(at::kCPU);
}

// A batch of row-major matrices as sgemm reads them: entry i at data + i * batch_stride, either
// as stored ('N', leading dim ld) or transposed ('T').
struct Operand {
  at::Tensor keep;  // holds the memory
  const float* data;
  int64_t batch_stride, ld;
  bool trans;
};

// x [batch, rows, cols] (any strides): read in place when its matrices are row-major or
// transposed row-major, else from a contiguous copy.
Operand operand_of(const at::Tensor& x) {
  const int64_t rows = x.size(1), cols = x.size(2);
  if (x.stride(2) == 1 && x.stride(1) >= std::max<int64_t>(cols, 1))
    return {x, x.data_ptr<float>(), x.stride(0), x.stride(1), false};
  if (x.stride(1) == 1 && x.stride(2) >= std::max<int64_t>(rows, 1))
    return {x, x.data_ptr<float>(), x.stride(0), x.stride(2), true};
  const at::Tensor c = x.contiguous();
  return {c, c.data_ptr<float>(), c.stride(0), c.stride(1), false};
}

// c [batch, M, N] = op(a) op(b) for every batch entry; `flip_a` / `flip_b` transpose the operand
// once more (the backward's a^T and b^T).
at::Tensor batched_product(const at::Tensor& a3, bool flip_a, const at::Tensor& b3, bool flip_b) {
  const Operand a = operand_of(a3), b = operand_of(b3);
  const bool ta = a.trans != flip_a, tb = b.trans != flip_b;
  const int64_t batch = a3.size(0);
  const int64_t m = flip_a ? a3.size(2) : a3.size(1), k = flip_a ? a3.size(1) : a3.size(2);
  const int64_t n = flip_b ? b3.size(1) : b3.size(2);
  at::Tensor c = at::empty({batch, m, n}, a3.options());
  float* cp = c.data_ptr<float>();
  for (int64_t i = 0; i < batch; ++i)
    cpu_sgemm(ta, tb, m, n, k, a.data + i * a.batch_stride, a.ld, b.data + i * b.batch_stride, b.ld, cp + i * m * n, n);
  return c;
}

struct CpuMatmulFn : public torch::autograd::Function<CpuMatmulFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a3, const at::Tensor& b3) {
    ctx->save_for_backward({a3, b3});
    return batched_product(a3, false, b3, false);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dc = grads[0].contiguous();
    at::Tensor da, db;
    if (ctx->needs_input_grad(0)) da = batched_product(dc, false, saved[1], true);  // dC B^T
    if (ctx->needs_input_grad(1)) db = batched_product(saved[0], true, dc, false);  // A^T dC
    return {da, db};
  }
};

// x2 [M, K] (contiguous) times w [N, K] (contiguous) transposed: [M, N]; a batch of one.
at::Tensor matmul_nt(const at::Tensor& x2, const at::Tensor& w) {
  return batched_product(x2.unsqueeze(0), false, w.unsqueeze(0), true).squeeze(0);
}

// dW [N, K] = dy^T x for dy [M, N] and x [M, K], both contiguous. Where N is at least 4 K and
// the matrix large (the tied LM head: N = vocabulary), oneDNN's sgemm runs dW^T = x^T dy faster
// than dy^T x, LibTorch's transposing copy back included: one thread, M 1024, N 4096, K 512,
// through this backward with the operands out of the cache, 38.4-38.7 -> 28.4-30.4 ms (a
// hand-written AVX2 transpose was no faster: 27.9-30.1 ms). Elsewhere dy^T x directly:
// transposing dy first, for an 'N' 'N' product, was 3-13 % slower at the 25 M model's other shapes.
at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x) {
  const int64_t m = dy.size(0), n = dy.size(1), k = x.size(1);
  at::Tensor dw = at::empty({n, k}, x.options());
  if (n >= 4 * k && n * k >= (int64_t{1} << 20)) {
    at::Tensor dwt = at::empty({k, n}, x.options());
    cpu_sgemm(true, false, k, n, m, x.data_ptr<float>(), k, dy.data_ptr<float>(), n, dwt.data_ptr<float>(), n);
    dw.copy_(dwt.t());
  } else {
    cpu_sgemm(true, false, n, k, m, dy.data_ptr<float>(), n, x.data_ptr<float>(), k, dw.data_ptr<float>(), k);
  }
  return dw;
}

struct CpuLinearFn : public torch::autograd::Function<CpuLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2, const at::Tensor& w) {
    ctx->save_for_backward({x2, w});
    return matmul_nt(x2, w);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0))
      dx = batched_product(dy.unsqueeze(0), false, saved[1].unsqueeze(0), false).squeeze(0);  // dy w
    if (ctx->needs_input_grad(1)) dw = weight_grad(dy, saved[0]);                              // dy^T x2
    return {dx, dw};
  }
};

// ys[i] = x2 W_i^T: one autograd node for several products of one input. Its backward sums the
// input gradient in sgemm's output (dx = dy_0 W_0, then dx += dy_i W_i through beta = 1), where
// separate nodes would have autograd add their input gradients in passes of their own.
struct CpuLinearGroupFn : public torch::autograd::Function<CpuLinearGroupFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2,
                                                at::TensorList ws) {
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no product for it
    std::vector<at::Tensor> saved{x2};
    torch::autograd::variable_list ys;
    for (const at::Tensor& w : ws) {
      saved.push_back(w);
      ys.push_back(matmul_nt(x2, w));
    }
    ctx->save_for_backward(saved);
    return ys;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x2 = saved[0];
    const int64_t m = x2.size(0), k = x2.size(1);
    torch::autograd::variable_list out(saved.size());
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) dx = at::empty({m, k}, x2.options());
    bool first = true;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) continue;
      const at::Tensor dy = grads[i].contiguous();
      const at::Tensor& w = saved[1 + i];
      if (dx.defined()) {
        cpu_sgemm(false, false, m, k, w.size(0), dy.data_ptr<float>(), w.size(0), w.data_ptr<float>(), k,
                  dx.data_ptr<float>(), k, first ? 0.0f : 1.0f);
        first = false;
      }
      if (ctx->needs_input_grad(1 + i)) out[1 + i] = weight_grad(dy, x2);
    }
    if (dx.defined() && first) dx.zero_();
    out[0] = dx;
    return out;
  }
};

// y[r] = dot(w row r, x) for rows [begin, end): 4 rows at a time, 16 columns per step.
__attribute__((target("avx2,fma"))) void bf16_gemv_avx2(const uint16_t* w, const float* x, int64_t k, int64_t begin,
                                                        int64_t end, float* y) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const uint16_t* rows[4] = {w + r * k, w + (r + 1) * k, w + (r + 2) * k, w + (r + 3) * k};
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
      for (int i = 0; i < 4; ++i) {
        acc[2 * i] = _mm256_fmadd_ps(load_bf16x8(rows[i] + c), x0, acc[2 * i]);
        acc[2 * i + 1] = _mm256_fmadd_ps(load_bf16x8(rows[i] + c + 8), x1, acc[2 * i + 1]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      float t = hsum8(_mm256_add_ps(acc[2 * i], acc[2 * i + 1]));
      for (int64_t j = c; j < k; ++j) t += bf16_bits_to_float(rows[i][j]) * x[j];
      y[r + i] = t;
    }
  }
  for (; r < end; ++r) {
    const uint16_t* row = w + r * k;
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) acc = _mm256_fmadd_ps(load_bf16x8(row + c), _mm256_loadu_ps(x + c), acc);
    float t = hsum8(acc);
    for (; c < k; ++c) t += bf16_bits_to_float(row[c]) * x[c];
    y[r] = t;
  }
}

void bf16_gemv_portable(const uint16_t* w, const float* x, int64_t k, int64_t begin, int64_t end, float* y) {
  for (int64_t r = begin; r < end; ++r) {
    float t = 0;
    for (int64_t c = 0; c < k; ++c) t += bf16_bits_to_float(w[r * k + c]) * x[c];
    y[r] = t;
  }
}

}  // namespace

at::Tensor cpu_bf16_gemv(const at::Tensor& x, const at::Tensor& weight) {
  ANDY_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kBFloat16 &&
                 weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && x.dim() >= 1 &&
                 x.numel() == x.size(-1) && x.size(-1) == weight.size(1),
             "cpu_bf16_gemv: one bf16 CPU row [.., K] and bf16 CPU weights [N, K] expected, got ", x.sizes(), " ",
             x.scalar_type(), " and ", weight.sizes(), " ", weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor w = weight.contiguous();
  const at::Tensor xf = x.reshape({k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({n}, xf.options());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool avx2 = has_avx2_fma();
  at::parallel_for(0, n, std::max<int64_t>(16, 32768 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    if (avx2) bf16_gemv_avx2(wp, xp, k, begin, end, yp);
    else bf16_gemv_portable(wp, xp, k, begin, end, yp);
  });
  auto shape = x.sizes().vec();
  shape.back() = n;
  return y.to(at::kBFloat16).view(shape);
}

bool cpu_gemm_enabled() { return sgemm_fn() != nullptr; }

void cpu_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc, float beta) {
  const SgemmFn fn = sgemm_fn();
  ANDY_CHECK(fn, "cpu_sgemm: oneDNN's dnnl_sgemm is not available in this process");
  const int status = fn(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  ANDY_CHECK(status == 0, "cpu_sgemm: dnnl_sgemm failed with status ", status, " (M ", m, ", N ", n, ", K ", k, ")");
}

void set_cpu_packed_weights(bool on) {
  PackedWeights& p = packed_weights();
  std::lock_guard<std::mutex> lock(p.mu);
  p.enabled = on;
  if (!on) p.by_tensor.clear();
}

bool cpu_packed_weights_available(at::ScalarType dtype) {
  return dtype == at::kFloat ? fp32_panels() || packed_sgemm().available()
                             : dtype == at::kBFloat16 && packed_bf16_gemm().available();
}

bool cpu_fp32_panels_on() {
  if (!fp32_panels()) return false;
  PackedWeights& p = packed_weights();
  std::lock_guard<std::mutex> lock(p.mu);
  return p.enabled;
}

int64_t cpu_packed_weight_bytes() {
  PackedWeights& p = packed_weights();
  std::lock_guard<std::mutex> lock(p.mu);
  int64_t total = 0;
  for (const auto& e : p.by_tensor)
    if (!e.second.owner.expired()) total += e.second.bytes;
  return total;
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight) {
  if (at::Tensor y; packed_linear(x, weight, y)) return y;
  if (!applies(x, weight)) return at::linear(x, weight);
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y;
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) y = CpuLinearFn::apply(x2, w);
  else y = matmul_nt(x2, w);
  return y.view(shape);
}

std::vector<at::Tensor> cpu_linear_group(const at::Tensor& x, at::TensorList weights) {
  bool grouped = at::GradMode::is_enabled() && !weights.empty();
  bool grad = x.requires_grad();
  for (const at::Tensor& w : weights) {
    grouped = grouped && applies(x, w);
    grad = grad || w.requires_grad();
  }
  std::vector<at::Tensor> ys;
  if (!grouped || !grad) {
    for (const at::Tensor& w : weights) ys.push_back(cpu_linear(x, w));
    return ys;
  }
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  std::vector<at::Tensor> ws;
  for (const at::Tensor& w : weights) ws.push_back(w.contiguous());
  ys = CpuLinearGroupFn::apply(x2, at::TensorList(ws));
  for (size_t i = 0; i < ys.size(); ++i) {
    auto shape = x.sizes().vec();
    shape.back() = weights[i].size(0);
    ys[i] = ys[i].view(shape);
  }
  return ys;
}

at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b) {
  const bool fits = cpu_gemm_enabled() && a.dim() >= 3 && a.dim() == b.dim() && a.device().is_cpu() &&
                    b.device().is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                    !compat::autocast_enabled(at::kCPU) && a.size(-1) == b.size(-2) &&
                    a.sizes().slice(0, a.dim() - 2) == b.sizes().slice(0, b.dim() - 2) && a.numel() > 0 &&
                    b.numel() > 0;
  if (!fits) return at::matmul(a, b);
  auto shape = a.sizes().vec();
  shape.back() = b.size(-1);
  // reshape keeps a transposed view a view when the batch dims are contiguous ones.
  const at::Tensor a3 = a.reshape({-1, a.size(-2), a.size(-1)}), b3 = b.reshape({-1, b.size(-2), b.size(-1)});
  at::Tensor c;
  if (at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad())) c = CpuMatmulFn::apply(a3, b3);
  else c = batched_product(a3, false, b3, false);
  return c.view(shape);
}

}  // namespace andy
