// The task_linear family on CUDA: the batched GEMM's interface between task_linear.cu and
// task_linear_host.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta {
namespace cuda {

// C[b] = act(A[b]·B[b] + bias[b]) for every batch b; C[b] += A[b]·B[b] where accumulate
// (bias null, act none); C[b] = A[b]·B[b] + addend[b] where addend is given (laid out as C;
// bias null, act none, no accumulate: the backward's gradient addends, in the epilogue).
struct Strided {
  const float* p;
  int64_t b, r, c;  // batch, row, column strides
};

void launch_batched_gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C,
                         const float* bias, int64_t bias_b, int act, float slope, bool accumulate,
                         cudaStream_t stream, const float* addend = nullptr);

// One batched GEMM's arguments, as launch_batched_gemm takes them.
struct Gemm {
  int64_t batches, M, N, K;
  Strided A, B;
  float* C;
  const float* bias;
  int64_t bias_b;
  int act;
  float slope;
  bool accumulate;
  const float* addend;
};

// Two independent batched GEMMs in one launch (the backward's dx and dw): grid z covers
// the first's batches, then the second's; x and y the larger of the two.
void launch_batched_gemm_pair(const Gemm& first, const Gemm& second, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta
