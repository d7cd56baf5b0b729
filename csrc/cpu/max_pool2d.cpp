// CPU kernels of the max_pool2d family (fastmeta/ops/max_pool2d.py): 2-D max pooling with
// the flat index h·W + w of each maximum in its plane, its backward (the gradient added at
// those indices) and the backward's backward (the gather at them). x is [B, C, H, W]
// contiguous. Grid: one work item per (b, c) plane, so the backward's additions never race
// (overlapping windows add into one plane from one thread, in output order). Memory-bound.
//
// The forward picks as aten's CPU kernel does (ATen/native/cpu/MaxPoolKernel.cpp): the
// window clipped to the input (padding never wins), the first maximum in row-major order,
// and a NaN always (so the last NaN of a window).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common.h"
#include "cpu_common.h"
#include "eager_nodes.h"

namespace fastmeta {
namespace cpu {
namespace {

int64_t check_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, "max_pool2d: ", name, " must have two values, got ", v);
  return v[0];
}

// Planes per parallel chunk: about kGrain elements of work each.
int64_t plane_grain(int64_t per_plane) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, per_plane)); }

// One tap across a row of windows: where src[ow·sw] beats the running maximum (or is a
// NaN), take it and its flat index base + ow·sw. Branch-free, with restrict pointers and
// values as parameters, so that gcc vectorises it (it did not inside the parallel body).
template <typename scalar_t>
void take_row_maximum(const scalar_t* __restrict src, int64_t base, int64_t sw, int64_t lo, int64_t hi,
                      scalar_t* __restrict row_y, int64_t* __restrict row_i) {
#pragma omp simd
  for (int64_t ow = lo; ow < hi; ++ow) {
    const scalar_t v = src[ow * sw];
    const bool take = v > row_y[ow] || v != v;
    row_y[ow] = take ? v : row_y[ow];
    row_i[ow] = take ? base + ow * sw : row_i[ow];
  }
}

// The window's geometry checked, and the pooled size of an H×W plane: {Ho, Wo}.
std::pair<int64_t, int64_t> pooled_size(const char* op, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair(kernel_size, "kernel_size");
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1];
  TORCH_CHECK_VALUE(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw, op,
                    ": kernel_size and stride must be positive, padding non-negative and at most half "
                    "the kernel, got kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding);
  return {(H + 2 * ph - kh) / sh + 1, (W + 2 * pw - kw) / sw + 1};
}

std::vector<at::Tensor> max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  FM_CHECK_DIM(x, 4);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto [Ho, Wo] = pooled_size("max_pool2d", H, W, kernel_size, stride, padding);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1];
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "max_pool2d: the output would be empty for input ", x.sizes(),
                    " and kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding);
  at::Tensor y = at::empty({B, C, Ho, Wo}, x.options());
  at::Tensor indices = at::empty({B, C, Ho, Wo}, x.options().dtype(at::kLong));
  if (y.numel() == 0) return {y, indices};
  dispatch_floating(x.scalar_type(), "max_pool2d", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    // Output columns whose window lies inside the row (no clipping): [ow_lo, ow_hi).
    const int64_t ow_lo = std::min(Wo, (pw + sw - 1) / sw);
    const int64_t ow_hi = std::max(ow_lo, std::min(Wo, W + pw - kw >= 0 ? (W + pw - kw) / sw + 1 : int64_t(0)));
    at::parallel_for(0, B * C, plane_grain(Ho * Wo * kh * kw), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* plane = xp + p * H * W;
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const int64_t h0 = std::max<int64_t>(oh * sh - ph, 0), h1 = std::min(oh * sh - ph + kh, H);
          scalar_t* row_y = yp + (p * Ho + oh) * Wo;
          int64_t* row_i = ip + (p * Ho + oh) * Wo;
          // The edge columns, whose windows are clipped: one window at a time.
          auto clipped = [&](int64_t ow) {
            const int64_t w0 = std::max<int64_t>(ow * sw - pw, 0), w1 = std::min(ow * sw - pw + kw, W);
            int64_t best = h0 * W + w0;
            scalar_t best_value = -std::numeric_limits<scalar_t>::infinity();
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) {
                const scalar_t v = plane[h * W + w];
                if (v > best_value || std::isnan(v)) {
                  best_value = v;
                  best = h * W + w;
                }
              }
            row_y[ow] = best_value;
            row_i[ow] = best;
          };
          for (int64_t ow = 0; ow < ow_lo; ++ow) clipped(ow);
          // The inner columns: tap by tap (row-major, so the first maximum and the last NaN
          // win as above) across the whole row, branch-free, so that the loop vectorises.
          // A window's values were compared one by one with a branch before: on random data
          // every other comparison mispredicted (CNN4's first pool took 21 ms).
          if (ow_hi > ow_lo) {
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
              row_y[ow] = -std::numeric_limits<scalar_t>::infinity();
              row_i[ow] = h0 * W + ow * sw - pw;
            }
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t j = 0; j < kw; ++j)
                take_row_maximum(plane + h * W + j - pw, h * W + j - pw, sw, ow_lo, ow_hi, row_y, row_i);
          }
          for (int64_t ow = ow_hi; ow < Wo; ++ow) clipped(ow);
        }
      }
    });
  });
  return {y, indices};
}

void check_indices(const at::Tensor& grad, const at::Tensor& indices, const char* name) {
  FM_CHECK_INPUT(grad, kCPU);
  FM_CHECK_FLOATING(grad);
  FM_CHECK_INPUT(indices, kCPU);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, name, ": indices must be int64, got ", indices.scalar_type());
  FM_CHECK_DIM(grad, 4);
  FM_CHECK_DIM(indices, 4);
  TORCH_CHECK_VALUE(grad.size(0) == indices.size(0) && grad.size(1) == indices.size(1), name,
                    ": the gradient and the indices must have the same B and C, got ", grad.sizes(), " and ",
                    indices.sizes());
}

// The pooled maps' size must be what the window gives for the plane: the window itself is
// not needed by the scatter, but the Triton kernel's gather form reads it, so every
// backend takes and checks the same arguments.
void check_pooled(const char* op, const at::Tensor& pooled, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                  at::IntArrayRef stride, at::IntArrayRef padding) {
  const auto [Ho, Wo] = pooled_size(op, H, W, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(pooled.size(2) == Ho && pooled.size(3) == Wo, op, ": the pooled maps must be ", Ho, "x", Wo,
                    " for a ", H, "x", W, " plane and kernel_size=", kernel_size, ", stride=", stride, ", padding=",
                    padding, ", got ", pooled.sizes());
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_y, const at::Tensor& indices, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_indices(grad_y, indices, "max_pool2d_backward");
  TORCH_CHECK_VALUE(grad_y.sizes() == indices.sizes(), "max_pool2d_backward: grad_y and indices must have one "
                    "shape, got ", grad_y.sizes(), " and ", indices.sizes());
  TORCH_CHECK_VALUE(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0,
                    "max_pool2d_backward: input_size must be [H, W], got ", input_size);
  check_pooled("max_pool2d_backward", grad_y, input_size[0], input_size[1], kernel_size, stride, padding);
  const int64_t B = grad_y.size(0), C = grad_y.size(1), HW = input_size[0] * input_size[1];
  const int64_t outputs = grad_y.size(2) * grad_y.size(3);
  // Zeroed plane by plane inside the loop: an at::zeros would be one more aten op (dispatch).
  at::Tensor grad_x = at::empty({B, C, input_size[0], input_size[1]}, grad_y.options());
  if (grad_x.numel() == 0) return grad_x;
  dispatch_floating(grad_y.scalar_type(), "max_pool2d_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const int64_t* ip = indices.data_ptr<int64_t>();
    scalar_t* op = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, plane_grain(outputs + HW), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(op + p * HW, op + (p + 1) * HW, scalar_t(0));
        for (int64_t o = 0; o < outputs; ++o) {
          const int64_t i = ip[p * outputs + o];
          TORCH_CHECK_INDEX(i >= 0 && i < HW, "max_pool2d_backward: index ", i, " out of range for a ",
                            input_size, " plane");
          op[p * HW + i] += gp[p * outputs + o];
        }
      }
    });
  });
  return grad_x;
}

at::Tensor max_pool2d_double_backward(const at::Tensor& grad_grad_x, const at::Tensor& indices,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_indices(grad_grad_x, indices, "max_pool2d_double_backward");
  check_pooled("max_pool2d_double_backward", indices, grad_grad_x.size(2), grad_grad_x.size(3), kernel_size, stride,
               padding);
  const int64_t B = indices.size(0), C = indices.size(1), HW = grad_grad_x.size(2) * grad_grad_x.size(3);
  const int64_t outputs = indices.size(2) * indices.size(3);
  at::Tensor out = at::empty(indices.sizes(), grad_grad_x.options());
  if (out.numel() == 0) return out;
  dispatch_floating(grad_grad_x.scalar_type(), "max_pool2d_double_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* gp = grad_grad_x.data_ptr<scalar_t>();
    const int64_t* ip = indices.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, plane_grain(outputs), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t o = 0; o < outputs; ++o) {
          const int64_t i = ip[p * outputs + o];
          TORCH_CHECK_INDEX(i >= 0 && i < HW, "max_pool2d_double_backward: index ", i, " out of range for a ",
                            grad_grad_x.size(2), "x", grad_grad_x.size(3), " plane");
          op[p * outputs + o] = gp[p * HW + i];
        }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// The eager path's autograd nodes in C++ (see "The eager path's autograd nodes in C++" in
// task_conv2d.cpp): what fastmeta/ops/max_pool2d.py's Python nodes do. The pooling's
// backward is the scatter at the indices, the scatter's backward the gather, the gather's
// the scatter again: every order runs through two nodes that build each other, and the
// indices are never differentiated.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

struct Window {
  std::vector<int64_t> kernel_size, stride, padding;
};

void save_window(AutogradContext* ctx, const Window& window) {
  ctx->saved_data["kernel_size"] = window.kernel_size;
  ctx->saved_data["stride"] = window.stride;
  ctx->saved_data["padding"] = window.padding;
}

Window saved_window(AutogradContext* ctx) {
  return {ctx->saved_data["kernel_size"].toIntVector(), ctx->saved_data["stride"].toIntVector(),
          ctx->saved_data["padding"].toIntVector()};
}

at::Tensor scatter(const at::Tensor& grad_y, const at::Tensor& indices, const std::vector<int64_t>& input_size,
                   const Window& window);
at::Tensor gather(const at::Tensor& grad_grad_x, const at::Tensor& indices, const Window& window);

struct MaxPoolScatterNode : public torch::autograd::Function<MaxPoolScatterNode> {
  // grad_x = max_pool2d_backward(grad_y, indices, input_size, window).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& indices,
                               std::vector<int64_t> input_size, std::vector<int64_t> kernel_size,
                               std::vector<int64_t> stride, std::vector<int64_t> padding) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    save_window(ctx, {kernel_size, stride, padding});
    return {recorded("fastmeta::max_pool2d_backward", "fastmeta_ext::max_pool2d_backward", [&] {
      return ::fastmeta::cpu::max_pool2d_backward(grad_y.contiguous(), indices.contiguous(), input_size, kernel_size,
                                                  stride, padding);
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    // One per forward argument: grad_y, indices, input_size, kernel_size, stride, padding.
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {none, none, none, none, none, none};
    return {gather(grads[0], ctx->get_saved_variables()[0], saved_window(ctx)), none, none, none, none, none};
  }
};

struct MaxPoolGatherNode : public torch::autograd::Function<MaxPoolGatherNode> {
  // out = max_pool2d_double_backward(grad_grad_x, indices, window).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_grad_x, const at::Tensor& indices,
                               std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                               std::vector<int64_t> padding) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    save_window(ctx, {kernel_size, stride, padding});
    ctx->saved_data["input_size"] = std::vector<int64_t>{grad_grad_x.size(2), grad_grad_x.size(3)};
    return {recorded("fastmeta::max_pool2d_double_backward", "fastmeta_ext::max_pool2d_double_backward", [&] {
      return ::fastmeta::cpu::max_pool2d_double_backward(grad_grad_x.contiguous(), indices.contiguous(), kernel_size,
                                                         stride, padding);
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    // One per forward argument: grad_grad_x, indices, kernel_size, stride, padding.
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {none, none, none, none, none};
    return {scatter(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["input_size"].toIntVector(),
                    saved_window(ctx)),
            none, none, none, none};
  }
};

// Through the node where autograd records (the upstream needs a gradient), else the kernel.
at::Tensor scatter(const at::Tensor& grad_y, const at::Tensor& indices, const std::vector<int64_t>& input_size,
                   const Window& window) {
  if (at::GradMode::is_enabled() && grad_y.requires_grad())
    return MaxPoolScatterNode::apply(grad_y, indices, input_size, window.kernel_size, window.stride,
                                     window.padding)[0];
  return recorded("fastmeta::max_pool2d_backward", "fastmeta_ext::max_pool2d_backward", [&] {
    return ::fastmeta::cpu::max_pool2d_backward(grad_y.contiguous(), indices.contiguous(), input_size,
                                                window.kernel_size, window.stride, window.padding);
  });
}

at::Tensor gather(const at::Tensor& grad_grad_x, const at::Tensor& indices, const Window& window) {
  if (at::GradMode::is_enabled() && grad_grad_x.requires_grad())
    return MaxPoolGatherNode::apply(grad_grad_x, indices, window.kernel_size, window.stride, window.padding)[0];
  return recorded("fastmeta::max_pool2d_double_backward", "fastmeta_ext::max_pool2d_double_backward", [&] {
    return ::fastmeta::cpu::max_pool2d_double_backward(grad_grad_x.contiguous(), indices.contiguous(),
                                                       window.kernel_size, window.stride, window.padding);
  });
}

struct MaxPoolNode : public torch::autograd::Function<MaxPoolNode> {
  // [y, indices] = max_pool2d(x, window); the indices are not differentiable. (The kernels are
  // called by their qualified names: unqualified, aten's overloads of the same names compete.)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, std::vector<int64_t> kernel_size,
                               std::vector<int64_t> stride, std::vector<int64_t> padding) {
    ctx->set_materialize_grads(false);
    std::vector<at::Tensor> out = recorded(nullptr, "fastmeta_ext::max_pool2d", [&] {
      return ::fastmeta::cpu::max_pool2d(x.contiguous(), kernel_size, stride, padding);
    });
    ctx->mark_non_differentiable({out[1]});
    ctx->save_for_backward({out[1]});
    save_window(ctx, {kernel_size, stride, padding});
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.size(2), x.size(3)};
    return {out[0], out[1]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    // One per forward argument: x, kernel_size, stride, padding.
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {none, none, none, none};
    return {scatter(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["input_size"].toIntVector(),
                    saved_window(ctx)),
            none, none, none};
  }
};

// The entries of the public ops' nodes (see task_conv2d_node in task_conv2d.cpp).
std::vector<at::Tensor> max_pool2d_node(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding) {
  return MaxPoolNode::apply(x, kernel_size.vec(), stride.vec(), padding.vec());
}

std::vector<at::Tensor> max_pool2d_backward_node(const at::Tensor& grad_y, const at::Tensor& indices,
                                                 at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  return MaxPoolScatterNode::apply(grad_y, indices, input_size.vec(), kernel_size.vec(), stride.vec(), padding.vec());
}

std::vector<at::Tensor> max_pool2d_double_backward_node(const at::Tensor& grad_grad_x, const at::Tensor& indices,
                                                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                        at::IntArrayRef padding) {
  return MaxPoolGatherNode::apply(grad_grad_x, indices, kernel_size.vec(), stride.vec(), padding.vec());
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("max_pool2d", &fastmeta::cpu::max_pool2d);
  m.impl("max_pool2d_backward", &fastmeta::cpu::max_pool2d_backward);
  m.impl("max_pool2d_double_backward", &fastmeta::cpu::max_pool2d_double_backward);
}

TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("max_pool2d_node(Tensor x, int[] kernel_size, int[] stride, int[] padding) -> Tensor[]");
  m.def("max_pool2d_backward_node(Tensor grad_y, Tensor indices, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] padding) -> Tensor[]");
  m.def("max_pool2d_double_backward_node(Tensor grad_grad_x, Tensor indices, int[] kernel_size, int[] stride, "
        "int[] padding) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("max_pool2d_node", &fastmeta::cpu::max_pool2d_node);
  m.impl("max_pool2d_backward_node", &fastmeta::cpu::max_pool2d_backward_node);
  m.impl("max_pool2d_double_backward_node", &fastmeta::cpu::max_pool2d_double_backward_node);
}
