// CUDA kernels of inner_step and its backward (float32; float64 runs the reference).
#include <cmath>
#include <cstdint>

#include "common_cuda.cuh"
#include "inner_step.cuh"

namespace fastmeta {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// inner_step: one launch over the whole [T, P] buffer (every layer's segment at once).
// The coefficient lr·mask·precond is formed per element from the [P]/[S] vectors (L2-
// resident); memory-bound at ~3 reads + 1 write per element.
// ---------------------------------------------------------------------------------------

__global__ void inner_step_kernel(const float* __restrict theta, bool theta_shared, const float* __restrict g,
                                  StepCoef c, int64_t T, int64_t P, float* __restrict out) {
  const int64_t n = T * P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % P;
    out[i] = (theta_shared ? theta[p] : theta[i]) - c.coef(p) * g[i];
  }
}

// One thread per parameter column p, looping over tasks (coalesced across threads):
// d_grad, d_theta, and −Σ_t grad_out·g for the rate, mask and preconditioner. Per-segment
// (or scalar) rate gradients are summed in shared memory per block, then one atomicAdd
// per segment per block.
__global__ void inner_step_backward_kernel(const float* __restrict go, const float* __restrict g, StepCoef c,
                                           int64_t T, int64_t P, int64_t S, bool theta_shared,
                                           float* d_theta, float* d_grad, float* d_lr, float* d_mask,
                                           float* d_precond, bool reduce_lr) {
  extern __shared__ float seg_sum[];
  if (reduce_lr)
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) seg_sum[s] = 0.f;
  __syncthreads();
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
    const float coef = c.coef(p);
    float sum_go = 0.f, outer = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float o = go[t * P + p];
      sum_go += o;
      outer -= o * g[t * P + p];
      if (d_grad) d_grad[t * P + p] = -coef * o;
      if (d_theta && !theta_shared) d_theta[t * P + p] = o;
    }
    if (d_theta && theta_shared) d_theta[p] = sum_go;
    const float m = c.mask ? c.mask[p] : 1.f, pc = c.precond ? c.precond[p] : 1.f;
    if (d_lr) {
      const float d = outer * m * pc;
      if (reduce_lr) atomicAdd(&seg_sum[c.scalar ? 0 : c.seg[p]], d);
      else d_lr[p] = d;
    }
    if (d_mask) d_mask[p] = outer * c.rate(p) * pc;
    if (d_precond) d_precond[p] = outer * c.rate(p) * m;
  }
  __syncthreads();
  if (reduce_lr)
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) atomicAdd(&d_lr[s], seg_sum[s]);
}

}  // namespace

void launch_inner_step(const float* theta, bool theta_shared, const float* g, StepCoef c, int64_t T, int64_t P,
                       float* out, cudaStream_t stream) {
  inner_step_kernel<<<blocks_for(T * P, 256), 256, 0, stream>>>(theta, theta_shared, g, c, T, P, out);
}

void launch_inner_step_backward(const float* go, const float* g, StepCoef c, int64_t T, int64_t P, int64_t S,
                                bool theta_shared, float* d_theta, float* d_grad, float* d_lr, float* d_mask,
                                float* d_precond, bool reduce_lr, cudaStream_t stream) {
  const size_t smem = reduce_lr ? S * sizeof(float) : 0;
  inner_step_backward_kernel<<<blocks_for(P, 256), 256, smem, stream>>>(go, g, c, T, P, S, theta_shared, d_theta,
                                                                        d_grad, d_lr, d_mask, d_precond, reduce_lr);
}

}  // namespace cuda
}  // namespace fastmeta
