// CUDA kernel of the task_linear family: one batched GEMM with a fused bias and activation.
#include <cmath>
#include <cstdint>

#include "common_cuda.cuh"
#include "task_linear.cuh"

namespace fastmeta {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// Batched GEMM for the task_linear family: C[b] = A[b]·B[b] (+ bias, activation), or
// C[b] += A[b]·B[b] where accumulate (no bias, no activation: the double backward's sum of
// two products), or C[b] = A[b]·B[b] + addend[b] (the backward's addends, read in the
// epilogue: no add launch of their own), with A
// and B read through strides, so that x·wᵀ, grad·w and gradᵀ·x need no transposed copies
// and a shared weight is a batch stride of 0. 32×32 output tiles, 8 K-slices staged in
// shared memory, 256 threads × 4 outputs each. fp32 FMA throughout (no TF32). One launch
// runs one GEMM, or two independent ones (grid z: the first's batches, then the
// second's; a block past its own GEMM's tiles returns at once, before any barrier).
// ---------------------------------------------------------------------------------------

constexpr int kTile = 32, kSlice = 8;

__global__ void batched_gemm_kernel(Gemm first, Gemm second) {
  __shared__ float As[kSlice][kTile + 1];
  __shared__ float Bs[kSlice][kTile + 1];
  const bool in_second = blockIdx.z >= first.batches;
  const Gemm& g = in_second ? second : first;
  const int64_t batch = in_second ? blockIdx.z - first.batches : blockIdx.z;
  const int64_t M = g.M, N = g.N, K = g.K;
  const Strided A = g.A, B = g.B;
  float* __restrict C = g.C;
  const float* __restrict bias = g.bias;
  const float* __restrict addend = g.addend;
  const int64_t bias_b = g.bias_b;
  const int act = g.act;
  const float slope = g.slope;
  const bool accumulate = g.accumulate;
  const int64_t m0 = blockIdx.y * (int64_t)kTile, n0 = blockIdx.x * (int64_t)kTile;
  if (m0 >= M || n0 >= N) return;  // the grid is sized for the larger GEMM: uniform per block
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;  // ty in [0, 8)
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const float* a = A.p + batch * A.b;
  const float* b = B.p + batch * B.b;
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    // Stage A[m0:m0+32, k0:k0+8] and B[k0:k0+8, n0:n0+32]: 256 values each, one per thread.
    {
      const int kk = threadIdx.x % kSlice, mm = threadIdx.x / kSlice;  // mm in [0, 32)
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < K) ? a[m * A.r + k * A.c] : 0.f;
      const int64_t n = n0 + tx, kb = k0 + ty;
      Bs[ty][tx] = (n < N && kb < K) ? b[kb * B.r + n * B.c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSlice; ++kk) {
      const float bv = Bs[kk][tx];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = fmaf(As[kk][ty + 8 * i], bv, acc[i]);
    }
    __syncthreads();
  }
  const int64_t n = n0 + tx;
  if (n >= N) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 8 * i;
    if (m >= M) continue;
    float v = acc[i];
    if (bias) v += bias[batch * bias_b + n];
    const int64_t at = (batch * M + m) * N + n;
    if (addend) v += addend[at];
    float* c = C + at;
    *c = accumulate ? *c + v : act_fwd(v, act, slope);
  }
}

}  // namespace

void launch_batched_gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C,
                         const float* bias, int64_t bias_b, int act, float slope, bool accumulate,
                         cudaStream_t stream, const float* addend) {
  const Gemm one{batches, M, N, K, A, B, C, bias, bias_b, act, slope, accumulate, addend};
  Gemm none = one;
  none.batches = 0;
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile, batches);
  batched_gemm_kernel<<<grid, 256, 0, stream>>>(one, none);
}

void launch_batched_gemm_pair(const Gemm& first, const Gemm& second, cudaStream_t stream) {
  const int64_t N = first.N > second.N ? first.N : second.N, M = first.M > second.M ? first.M : second.M;
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile, first.batches + second.batches);
  batched_gemm_kernel<<<grid, 256, 0, stream>>>(first, second);
}

}  // namespace cuda
}  // namespace fastmeta
