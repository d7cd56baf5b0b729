// CPU kernel of activation_grad: grad_y · f'(y), one vectorised pass, one loop per
// activation so that each vectorises; and its autograd node in C++ (the eager path, see
// "The eager path's autograd nodes in C++" in task_conv2d.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "activation.h"
#include "cpu_common.h"
#include "eager_nodes.h"

namespace fastmeta {
namespace cpu {
namespace {

at::Tensor activation_grad(const at::Tensor& grad_y, const at::Tensor& y, c10::string_view act_name,
                           double negative_slope) {
  FM_CHECK_INPUT(grad_y, kCPU);
  FM_CHECK_INPUT(y, kCPU);
  FM_CHECK_FLOATING(y);
  FM_CHECK_SAME_DTYPE(grad_y, y);
  TORCH_CHECK_VALUE(grad_y.sizes() == y.sizes(), "grad_y must be ", y.sizes(), ", got ", grad_y.sizes());
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  at::Tensor out = at::empty_like(y);
  const int64_t n = y.numel();
  dispatch_floating(y.scalar_type(), "activation_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* yy = y.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(negative_slope);
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      switch (act) {  // one loop per activation, so that each vectorises
        case Act::Relu:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = yy[i] > 0 ? gy[i] : scalar_t(0);
          break;
        case Act::LeakyRelu:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = yy[i] > 0 ? gy[i] : gy[i] * s;
          break;
        case Act::Tanh:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = gy[i] * (scalar_t(1) - yy[i] * yy[i]);
          break;
        case Act::Sigmoid:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = gy[i] * yy[i] * (scalar_t(1) - yy[i]);
          break;
        default:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = gy[i];
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// activation_grad's node: what fastmeta/ops/activation.py's Python node does. Its backward:
// d grad_y = activation_grad(upstream, y) (this node again, where autograd records), and
// d y = upstream · grad_y · d f'/dy for tanh (−2y) and sigmoid (1 − 2y) (gradient_at_y:
// one pass where the Python node runs three aten ops, the same values bit for bit); none
// for the piecewise-linear activations, whose f' is constant where it is defined
// (undefined: autograd computes nothing for it).
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// d y = upstream · grad_y · d f'/dy for tanh (−2y) and sigmoid (1 − 2y), in one pass: the
// values of the Python node's three aten ops, bit for bit ((upstream · grad_y) · (−2y) and
// (upstream · grad_y) · (1 − 2y), each product rounded as they round it; 2y is exact, so
// a contracted 1 − 2y rounds once as the two ops do). Where autograd records (third order),
// those aten ops themselves, which differentiate.
at::Tensor gradient_at_y(const at::Tensor& upstream, const at::Tensor& grad_y, const at::Tensor& y, Act act) {
  if (at::GradMode::is_enabled() && (upstream.requires_grad() || grad_y.requires_grad() || y.requires_grad()))
    return act == Act::Tanh ? at::mul(at::mul(upstream, grad_y), at::mul(y, -2))
                            : at::mul(at::mul(upstream, grad_y), at::rsub(at::mul(y, 2), 1));
  const at::Tensor u = upstream.contiguous(), g = grad_y.contiguous(), v = y.contiguous();
  at::Tensor out = at::empty_like(v);
  const int64_t n = v.numel();
  dispatch_floating(v.scalar_type(), "activation_grad_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t *up = u.data_ptr<scalar_t>(), *gy = g.data_ptr<scalar_t>(), *yy = v.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      if (act == Act::Tanh) {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) o[i] = (up[i] * gy[i]) * (yy[i] * scalar_t(-2));
      } else {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) o[i] = (up[i] * gy[i]) * (scalar_t(1) - yy[i] * scalar_t(2));
      }
    });
  });
  return out;
}

at::Tensor activation_grad_kernel(const at::Tensor& grad_y, const at::Tensor& y, const std::string& act,
                                  double negative_slope) {
  return recorded("fastmeta::activation_grad", "fastmeta_ext::activation_grad",
                  [&] { return activation_grad(grad_y.contiguous(), y.contiguous(), act, negative_slope); });
}

struct ActivationGradNode : public torch::autograd::Function<ActivationGradNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& y, std::string act,
                               double negative_slope) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_y, y});
    ctx->saved_data["act"] = act;
    ctx->saved_data["negative_slope"] = negative_slope;
    return {activation_grad_kernel(grad_y, y, act, negative_slope)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return {none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_y = saved[0], &y = saved[1];
    const std::string act = ctx->saved_data["act"].toStringRef();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    at::Tensor d_grad_y, d_y;
    if (ctx->needs_input_grad(0)) d_grad_y = activation_grad_on_node(upstream, y, act, slope);
    if (ctx->needs_input_grad(1)) {
      const Act kind = parse_act(act);
      if (kind == Act::Tanh || kind == Act::Sigmoid) d_y = gradient_at_y(upstream, grad_y, y, kind);
    }
    // One per forward argument: grad_y, y, act, negative_slope.
    return {d_grad_y, d_y, none, none};
  }
};

std::vector<at::Tensor> activation_grad_node(const at::Tensor& grad_y, const at::Tensor& y, c10::string_view act,
                                             double negative_slope) {
  return ActivationGradNode::apply(grad_y, y, std::string(act.data(), act.size()), negative_slope);
}

}  // namespace

at::Tensor activation_grad_on_node(const at::Tensor& grad_y, const at::Tensor& y, const std::string& act,
                                   double negative_slope) {
  if (at::GradMode::is_enabled() && (grad_y.requires_grad() || y.requires_grad()))
    return ActivationGradNode::apply(grad_y, y, act, negative_slope)[0];
  return activation_grad_kernel(grad_y, y, act, negative_slope);
}

}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("activation_grad", &fastmeta::cpu::activation_grad);
}

// The eager node's entry (see task_conv2d_node in task_conv2d.cpp).
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("activation_grad_node(Tensor grad_y, Tensor y, str act, float negative_slope) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("activation_grad_node", &fastmeta::cpu::activation_grad_node);
}
