// Dynamic int8 linear through LibTorch's quantized operators (see int8_linear.h).
#include "parallel/int8_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <mutex>

#include "core/base/error.h"

namespace andy {

namespace {

// The oneDNN quantized engine, selected once per process (QNNPACK, the other engine in
// Debian's build, is slower than fp32 on x86).
void use_onednn_engine() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (at::QEngine e : at::globalContext().supportedQEngines())
      if (e == at::QEngine::ONEDNN) {
        at::globalContext().setQEngine(e);
        return;
      }
  });
}

c10::OperatorHandle op_named(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

std::vector<c10::IValue> call_op(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack;
}

}  // namespace

Int8Linear::Int8Linear(const at::Tensor& q, const at::Tensor& scale) {
  ANDY_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "Int8Linear: int8 [out, in] weight expected, got ",
             q.scalar_type(), " ", q.sizes());
  ANDY_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0), "Int8Linear: one scale per output row expected, got ",
             scale.sizes(), " for weight ", q.sizes());
  out_ = q.size(0);
  in_ = q.size(1);
  use_onednn_engine();
  at::Tensor s = scale.to(at::kCPU, at::kDouble).contiguous();
  s = s.masked_fill(s == 0, 1.0);
  at::Tensor qw = at::_make_per_channel_quantized_tensor(q.to(at::kCPU).contiguous(), s,
                                                        at::zeros({out_}, at::kLong), 0);
  packed_ = call_op(op_named("quantized::linear_prepack"), {qw, c10::IValue()})[0];
}

at::Tensor Int8Linear::forward(const at::Tensor& x) const {
  ANDY_CHECK(x.size(-1) == in_, "Int8Linear: input has ", x.size(-1), " features, the weight ", in_);
  auto shape = x.sizes().vec();
  at::Tensor x2 = x.reshape({-1, in_}).to(at::kFloat).contiguous();
  static const c10::OperatorHandle op = op_named("quantized::linear_dynamic");
  at::Tensor y = call_op(op, {x2, packed_, false})[0].toTensor();
  shape.back() = out_;
  return y.view(shape);
}

}  // namespace andy
