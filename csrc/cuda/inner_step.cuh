// inner_step on CUDA: the interface between its kernels (inner_step.cu, no torch headers:
// ATen's cost ~40 s of nvcc time per file) and their host wrappers (inner_step_host.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta {
namespace cuda {

struct StepCoef {
  const float* lr;
  const int64_t* seg;
  const float* mask;
  const float* precond;
  bool scalar;
#ifdef __CUDACC__
  __device__ __forceinline__ float rate(int64_t p) const { return scalar ? lr[0] : (seg ? lr[seg[p]] : lr[p]); }
  __device__ __forceinline__ float coef(int64_t p) const {
    float r = rate(p);
    if (mask) r *= mask[p];
    if (precond) r *= precond[p];
    return r;
  }
#endif
};

void launch_inner_step(const float* theta, bool theta_shared, const float* g, StepCoef c, int64_t T, int64_t P,
                       float* out, cudaStream_t stream);
// S: the number of rates summed in shared memory (1 for a scalar lr, S for segments).
void launch_inner_step_backward(const float* go, const float* g, StepCoef c, int64_t T, int64_t P, int64_t S,
                                bool theta_shared, float* d_theta, float* d_grad, float* d_lr, float* d_mask,
                                float* d_precond, bool reduce_lr, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta
