// CPU kernel of activation_grad: grad_y · f'(y), one vectorised pass, one loop per
// activation so that each vectorises.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "cpu_common.h"

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

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("activation_grad", &fastmeta::cpu::activation_grad);
}
