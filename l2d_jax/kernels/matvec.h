// Few-row float32 matrix products on rows of weights held in memory: the loops the matvec and
// the decoder-stack kernels share (cpu_matvec.cc, cpu_decoder.cc).
#pragma once

#include <algorithm>
#include <cstdint>

namespace l2d {

constexpr int64_t kTileFloats = 4096;  // M x tile floats of y per row pass (kn): 16 KiB
constexpr int64_t kMinBytesPerPart = 1 << 16;  // do not split weights below 64 KiB a part

// How many parts to split products over `weight_bytes` of weights into: one per thread,
// none smaller than kMinBytesPerPart.
inline int64_t Parts(int64_t weight_bytes, int64_t threads) {
  return std::clamp<int64_t>(weight_bytes / kMinBytesPerPart, 1, threads);
}

// Whether (K, N) products whose outputs add up to `total` columns split the rows of the
// weights (narrow: each part sums into its own buffer) rather than the columns (wide).
inline bool SplitRows(int64_t total, int64_t parts) { return total < parts * 1024; }

// y[:, n0:n1] (+)= x[:, k0:k1] @ w[k0:k1, n0:n1]; y has leading dimension ldy.
inline void AccumulateKN(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                         int64_t k0, int64_t k1, int64_t n0, int64_t n1, int64_t ldy, bool zero) {
  if (zero)
    for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0.0f);
  // whole rows when y fits in L1 (M = 1: N <= 4096), else column tiles of 16 KiB of y
  const int64_t tile = std::max<int64_t>(256, kTileFloats / M);
  for (int64_t c0 = n0; c0 < n1; c0 += tile) {
    const int64_t c1 = std::min(n1, c0 + tile);
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      const float* __restrict w0 = w + k * N;
      const float* __restrict w1 = w0 + N;
      const float* __restrict w2 = w1 + N;
      const float* __restrict w3 = w2 + N;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
        float* __restrict ym = y + m * ldy;
#pragma omp simd
        for (int64_t j = c0; j < c1; ++j) ym[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
      }
    }
    for (; k < k1; ++k) {
      const float* __restrict w0 = w + k * N;
      for (int64_t m = 0; m < M; ++m) {
        const float a0 = x[m * K + k];
        float* __restrict ym = y + m * ldy;
#pragma omp simd
        for (int64_t j = c0; j < c1; ++j) ym[j] += a0 * w0[j];
      }
    }
  }
}

// y[:, n0:n1] = x @ w[n0:n1, :]^T, eight rows of w at a time: eight independent sums, each a
// vector accumulator, keep the FMA units busy while the rows stream in (four sums leave the
// loop latency-bound: 0.6x the reading speed of eight on cached (576-wide) rows, ~8 % slower on
// the LM head from memory).
inline void DotsNK(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                   int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const float* __restrict r = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict xm = x + m * K;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f, s5 = 0.0f, s6 = 0.0f, s7 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
      for (int64_t k = 0; k < K; ++k) {
        const float a = xm[k];
        s0 += r[k] * a, s1 += r[K + k] * a, s2 += r[2 * K + k] * a, s3 += r[3 * K + k] * a;
        s4 += r[4 * K + k] * a, s5 += r[5 * K + k] * a, s6 += r[6 * K + k] * a, s7 += r[7 * K + k] * a;
      }
      float* ym = y + m * N + n;
      ym[0] = s0, ym[1] = s1, ym[2] = s2, ym[3] = s3, ym[4] = s4, ym[5] = s5, ym[6] = s6, ym[7] = s7;
    }
  }
  for (; n < n1; ++n) {
    const float* __restrict wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict xm = x + m * K;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += wr[k] * xm[k];
      y[m * N + n] = s;
    }
  }
}

}  // namespace l2d
