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
#include <vector>

#include "matvec.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using l2d::AccumulateKN;
using l2d::DotsNK;

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
  const int64_t parts = l2d::Parts(K * total * static_cast<int64_t>(sizeof(float)), l2d::PoolThreads(pool));

  if (transposed) {  // split the output rows: no reduction
    l2d::ParallelFor(pool, parts, parts, [&](int64_t p) {
      const auto [v0, v1] = l2d::Share(total, parts, p, 1);
      ForColumns(blocks, v0, v1, [&](const Block& b, int64_t n0, int64_t n1) {
        DotsNK(xp, b.w, b.y, M, K, b.n, n0, n1);
      });
    });
  } else if (!l2d::SplitRows(total, parts)) {  // wide: split the columns, write y directly
    l2d::ParallelFor(pool, parts, parts, [&](int64_t p) {
      const auto [v0, v1] = l2d::Share(total, parts, p, 16);
      ForColumns(blocks, v0, v1, [&](const Block& b, int64_t n0, int64_t n1) {
        AccumulateKN(xp, b.w, b.y, M, K, b.n, 0, K, n0, n1, b.n, /*zero=*/true);
      });
    });
  } else {  // narrow: split the rows of w, part 0 into y, the others into scratch, then sum
    float* partial = parts > 1 ? l2d::ThreadScratch<struct Partials>((parts - 1) * M * total) : nullptr;
    l2d::ParallelFor(pool, parts, parts, [&](int64_t p) {
      const auto [k0, k1] = l2d::Share(K, parts, p, 4);
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
