// Few-row float32 matrix products for XLA:CPU, as an XLA FFI custom call (cpu_matvec.py).
//
//   transposed = false: y_i (M, N_i) = x (M, K) @ w_i (K, N_i)    (Linear kernels, (in, out))
//   transposed = true:  y_i (M, N_i) = x (M, K) @ w_i (N_i, K)^T  (the tied LM head, (V, H))
//
// for one or more weights w_i that share the input x (q/k/v, gate/up, a LoRA's A beside its
// base kernel): one call, one split over the cores, as if the w_i were one matrix
// concatenated along N (without copying them).
//
// Batch-1 decoding is a chain of matrix-vector products whose cost is reading the weights
// once. This kernel reads every weight once, whole rows at a time (the hardware prefetcher's
// best case), and splits the work over the threads of XLA's own intra-op pool (parallel.h: it
// neither oversubscribes the cores nor keeps threads of its own).
//
// Splits: the (N, K) layout splits the outputs (no reduction); (K, N) splits the columns when
// the N_i add up to a wide matrix, else the rows, each part summing into its own buffer,
// added up at the end.

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileFloats = 4096;         // M x tile floats of y per row pass (kn): 16 KiB
constexpr int64_t kMinBytesPerPart = 1 << 16; // do not split below 64 KiB of weights a part

// y[:, n0:n1] (+)= x[:, k0:k1] @ w[k0:k1, n0:n1]; y has leading dimension ldy.
void AccumulateKN(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
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
void DotsNK(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
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

// One part per pool thread (the caller is one of them), none smaller than kMinBytesPerPart.
int64_t Parts(ffi::ThreadPool& pool, int64_t weight_bytes) {
  return std::clamp<int64_t>(weight_bytes / kMinBytesPerPart, 1, l2d::PoolThreads(pool));
}

// Per-thread scratch for the partial sums of a row split (grown, never shrunk).
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// One weight of the call: w (K, n) or (n, K), its output y (M, n), and its first column in
// the concatenation of all the call's outputs.
struct Block {
  const float* w;
  float* y;
  int64_t n, offset;
};

// fn(block, n0, n1) for each block's columns [n0, n1) inside the concatenated columns [v0, v1).
template <typename Fn>
void ForColumns(const std::vector<Block>& blocks, int64_t v0, int64_t v1, const Fn& fn) {
  for (const Block& b : blocks) {
    const int64_t n0 = std::max(v0, b.offset) - b.offset;
    const int64_t n1 = std::min(v1, b.offset + b.n) - b.offset;
    if (n0 < n1) fn(b, n0, n1);
  }
}

ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                      ffi::RemainingRets ys, bool transposed) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("l2d_matvec: x must be 2-D");
  if (ws.size() == 0 || ws.size() != ys.size())
    return ffi::Error::InvalidArgument("l2d_matvec: needs one output per weight, at least one");
  const int64_t M = xd[0], K = xd[1];
  std::vector<Block> blocks;
  int64_t total = 0;  // columns of all outputs together
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("l2d_matvec: weights and outputs must be float32");
    const auto wd = w->dimensions();
    if (wd.size() != 2) return ffi::Error::InvalidArgument("l2d_matvec: weights must be 2-D");
    if ((transposed ? wd[1] : wd[0]) != K)
      return ffi::Error::InvalidArgument("l2d_matvec: contracting dimensions differ");
    const int64_t n = transposed ? wd[0] : wd[1];
    blocks.push_back({w->typed_data(), (*y)->typed_data(), n, total});
    total += n;
  }
  const float* xp = x.typed_data();
  const int64_t parts = Parts(pool, K * total * static_cast<int64_t>(sizeof(float)));
  // part p's share of the concatenated columns, cut at multiples of `round` (the last part
  // takes the rest)
  auto columns = [&](int64_t p, int64_t round) {
    const int64_t v0 = (total * p / parts) / round * round;
    const int64_t v1 = p + 1 == parts ? total : (total * (p + 1) / parts) / round * round;
    return std::pair<int64_t, int64_t>(v0, v1);
  };

  if (transposed) {  // split the output rows: no reduction
    l2d::ParallelFor(pool, parts, parts, [&](int64_t p) {
      const auto [v0, v1] = columns(p, 1);
      ForColumns(blocks, v0, v1, [&](const Block& b, int64_t n0, int64_t n1) {
        DotsNK(xp, b.w, b.y, M, K, b.n, n0, n1);
      });
    });
  } else if (total >= parts * 1024) {  // wide: split the columns, write y directly
    l2d::ParallelFor(pool, parts, parts, [&](int64_t p) {
      const auto [v0, v1] = columns(p, 16);
      ForColumns(blocks, v0, v1, [&](const Block& b, int64_t n0, int64_t n1) {
        AccumulateKN(xp, b.w, b.y, M, K, b.n, 0, K, n0, n1, b.n, /*zero=*/true);
      });
    });
  } else {  // narrow: split the rows of w, part 0 into y, the others into scratch, then sum
    float* partial = parts > 1 ? Scratch((parts - 1) * M * total) : nullptr;
    l2d::ParallelFor(pool, parts, parts, [&](int64_t p) {
      const int64_t k0 = (K * p / parts) / 4 * 4;
      const int64_t k1 = p + 1 == parts ? K : (K * (p + 1) / parts) / 4 * 4;
      for (const Block& b : blocks) {
        float* out = p == 0 ? b.y : partial + ((p - 1) * total + b.offset) * M;
        AccumulateKN(xp, b.w, out, M, K, b.n, k0, k1, 0, b.n, b.n, /*zero=*/true);
      }
    });
    for (int64_t p = 1; p < parts; ++p) {
      for (const Block& b : blocks) {
        const float* __restrict src = partial + ((p - 1) * total + b.offset) * M;
#pragma omp simd
        for (int64_t i = 0; i < M * b.n; ++i) b.y[i] += src[i];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2dMatvecF32, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<bool>("transposed"));
