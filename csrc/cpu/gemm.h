// A small-matrix GEMM for the CPU kernels: C[M,N] (+)= A[M,K] · B[K,N].
//
// A is read through arbitrary strides (a_rs, a_cs), so one routine serves the three
// products a linear layer needs without copies: x·Wᵀ (with Wᵀ materialised once), δ·W and
// δᵀ·h. B and C are row-major with leading dimensions ldb and ldc.
//
// Why hand-written: the meta-step's matrices are tiny (W1: 10×40 by 40×40). At that size
// a BLAS call costs more in dispatch and packing than the ~16k multiply-adds it does. The
// micro-kernel below keeps an MR×NR tile of C in registers (6×16 floats = 12 AVX2
// registers) and streams one row of B per k, broadcasting A: 6 FMAs per load of B, which
// keeps the FMA ports busy instead of the load/store ports (an axpy-form loop does one
// load + one store per FMA and runs at about a third of the speed, measured on W1).
// Column tails (N not a multiple of NR) take a plain loop; the MLP meta-step pads every
// row to a multiple of NR so that it never takes it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastmeta {
namespace cpu {

template <typename T>
struct Tile {
  // 64 bytes of C per row: 16 floats or 8 doubles; 6 rows -> 12 (float) or 12 (double)
  // accumulator vectors at 256 bits, within the 16 AVX2 registers.
  static constexpr int NR = 64 / sizeof(T);
  static constexpr int MR = 6;
};

template <typename T, int MR, int NR>
inline void gemm_tile(int64_t K, const T* __restrict A, int64_t a_rs, int64_t a_cs,
                      const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                      bool accumulate) {
  T c[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) c[r][j] = accumulate ? C[r * ldc + j] : T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * a_rs + k * a_cs];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) c[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) C[r * ldc + j] = c[r][j];
}

// Columns [n0, n1) of rows [m0, m0 + rows): the tail that no full tile covers.
template <typename T>
inline void gemm_tail(int64_t rows, int64_t n0, int64_t n1, int64_t K, const T* A, int64_t a_rs,
                      int64_t a_cs, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    T* c = C + r * ldc;
    if (!accumulate)
      for (int64_t j = n0; j < n1; ++j) c[j] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[r * a_rs + k * a_cs];
      const T* b = B + k * ldb;
#pragma omp simd
      for (int64_t j = n0; j < n1; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T, int MR>
inline void gemm_rows(int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int NR = Tile<T>::NR;
  int64_t n = 0;
  for (; n + NR <= N; n += NR)
    gemm_tile<T, MR, NR>(K, A, a_rs, a_cs, B + n, ldb, C + n, ldc, accumulate);
  if (n < N) gemm_tail<T>(MR, n, N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}

// C[M,N] (+)= A[M,K] · B[K,N], serial (callers parallelise over tasks or row blocks).
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                 const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = Tile<T>::MR;
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_rows<T, MR>(N, K, A + m * a_rs, a_rs, a_cs, B, ldb, C + m * ldc, ldc, accumulate);
  const T* a = A + m * a_rs;
  T* c = C + m * ldc;
  switch (M - m) {  // the row tail, still register-tiled
    case 5: gemm_rows<T, 5>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_rows<T, 4>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_rows<T, 3>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows<T, 2>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows<T, 1>(N, K, a, a_rs, a_cs, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace fastmeta
