// Device helpers shared by the CUDA sources: activations and a deterministic block sum.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fastmeta {
namespace cuda {

// The numbering of fastmeta::Act (csrc/common.h).
enum ActCode : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3, kSigmoid = 4 };

__device__ __forceinline__ float act_fwd(float z, int act, float slope) {
  switch (act) {
    case kRelu: return (z > 0.f || z != z) ? z : 0.f;  // NaN passes, as in torch.relu
    case kLeakyRelu: return z > 0.f ? z : z * slope;
    case kTanh: return tanhf(z);
    case kSigmoid: return 1.f / (1.f + expf(-z));
    default: return z;
  }
}

// f'(z) and f''(z), written in y = f(z).
__device__ __forceinline__ float act_d1(float y, int act, float slope) {
  switch (act) {
    case kRelu: return y > 0.f ? 1.f : 0.f;
    case kLeakyRelu: return y > 0.f ? 1.f : slope;
    case kTanh: return 1.f - y * y;
    case kSigmoid: return y * (1.f - y);
    default: return 1.f;
  }
}

__device__ __forceinline__ float act_d2(float y, int act) {
  if (act == kTanh) return -2.f * y * (1.f - y * y);
  if (act == kSigmoid) return y * (1.f - y) * (1.f - 2.f * y);
  return 0.f;
}

// Σ over the block of v, returned to every thread. Fixed reduction order (warp shuffles,
// then warp 0 over the warps' partials), so results are bitwise reproducible. `scratch`
// holds 33 floats of shared memory; every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    float w = lane < warps ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) w += __shfl_down_sync(0xffffffffu, w, o);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// Blocks for a grid-stride loop over n elements: a few waves are enough (132 SMs × 8 on
// an H100).
inline int blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 132 * 8 ? (b > 0 ? b : 1) : 132 * 8);
}

}  // namespace cuda
}  // namespace fastmeta
