// A small-matrix GEMM for the CPU kernels: C[M,N] (+)= A[M,K] · B[K,N].
//
// A is read through arbitrary strides (a_rs, a_cs), so one routine serves the three
// products a linear layer needs without copies: x·Wᵀ (with Wᵀ materialised once), δ·W and
// δᵀ·h. B and C are row-major with leading dimensions ldb and ldc.
//
// Why hand-written: the meta-step's matrices are tiny (W1: 10×40 by 40×40). At that size
// a BLAS call costs more in dispatch and packing than the ~16k multiply-adds it does. The
// micro-kernel below keeps an MR×NR tile of C in registers (6×16 floats = 12 AVX2
// registers) and streams one row of B per k, broadcasting A: 12 FMAs per two loads of B,
// which keeps the FMA ports busy instead of the load/store ports (an axpy-form loop does
// one load + one store per FMA).
// Column tails (N not a multiple of NR) take a plain loop; the MLP meta-step pads every
// row to a multiple of NR so that it never takes it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastmeta {
namespace cpu {

// GCC/Clang vector types, 256 bits: 8 floats or 4 doubles. The micro-kernel is written
// with them rather than left to the auto-vectoriser: with plain arrays, gcc 12 compiled
// the same tile well at one call site and ~15x slower at another (measured 0.6 µs vs
// 10 µs for 10×48×40), depending on the inlining context. aligned(sizeof(T)) allows the
// unaligned loads that strided rows need.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
  static constexpr int W = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
  static constexpr int W = 4;
};

template <typename T>
struct Tile {
  // One row of a C tile is NV vectors = NR = 8 values: 8 floats (one vector) or 8 doubles
  // (two). 8, not 16: W1's hidden width 40 is 5 tiles of 8 but 3 of 16 (48, 20% wasted),
  // and its 1-wide input and output layers pad to 8 instead of 16.
  static constexpr int NV = sizeof(T) == 4 ? 1 : 2;
  static constexpr int NR = NV * Vec<T>::W;
  // Up to MR_MAX rows per tile: MR_MAX·NV accumulators (12) plus the B vectors and a
  // broadcast fit the 16 AVX2 registers. Per k a tile does MR·NV FMAs for MR broadcast
  // loads + NV vector loads: ~1.8 FMAs per cycle at MR = 10..12 (2 is the peak).
  static constexpr int MR_MAX = sizeof(T) == 4 ? 12 : 6;
};

template <typename T, int MR>
inline void gemm_tile(int64_t K, const T* __restrict A, int64_t a_rs, int64_t a_cs,
                      const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                      bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W, NV = Tile<T>::NV;
  V c[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? *reinterpret_cast<const V*>(C + r * ldc + v * W) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(B + k * ldb + v * W);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * a_rs + k * a_cs];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + r * ldc + v * W) = c[r][v];
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
    gemm_tile<T, MR>(K, A, a_rs, a_cs, B + n, ldb, C + n, ldc, accumulate);
  if (n < N) gemm_tail<T>(MR, n, N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}

template <typename T>
inline void gemm_rows_any(int mr, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                          const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  switch (mr) {
#define FM_ROWS(R) \
  case R: return gemm_rows<T, (R <= Tile<T>::MR_MAX ? R : 1)>(N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
    FM_ROWS(1) FM_ROWS(2) FM_ROWS(3) FM_ROWS(4) FM_ROWS(5) FM_ROWS(6)
    FM_ROWS(7) FM_ROWS(8) FM_ROWS(9) FM_ROWS(10) FM_ROWS(11) FM_ROWS(12)
#undef FM_ROWS
    default: break;
  }
}

// C[M,N] (+)= A[M,K] · B[K,N], serial (callers parallelise over tasks or row blocks).
// Rows are split into the fewest tiles of at most MR_MAX rows, as even as possible: M = 10
// is one 10-row tile (not 6 + 4), M = 40 four of 10.
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                 const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t MR = Tile<T>::MR_MAX;
  const int64_t tiles = (M + MR - 1) / MR;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = (M - m) / (tiles - t) + ((M - m) % (tiles - t) ? 1 : 0);
    gemm_rows_any<T>(static_cast<int>(rows), N, K, A + m * a_rs, a_rs, a_cs, B, ldb, C + m * ldc, ldc,
                     accumulate);
    m += rows;
  }
}

}  // namespace cpu
}  // namespace fastmeta
