// Decoding attention for XLA:CPU over one layer of a stacked KV cache, read in place, as an
// XLA FFI custom call (cpu_attention.py).
//
//   q (B, T, H, hd), k / v (L, B, Hkv, S, hd) (the whole stacked cache), mask (B, T, S) bool,
//   layer () int32 (an operand, so that a scan over layers can pass its index) -> out (B, T, H, hd):
//   out[b, t, h] = softmax_s(where(mask[b, t, s], q[b, t, h] . k[layer, b, g, s] / sqrt(hd),
//                                  -FLT_MAX)) @ v[layer, b, g]    with g = h / (H / Hkv)
//
// the same arithmetic as llm.attend (scores and softmax in float32, max subtracted, divided by
// the sum before the product with v), in another summation order. What XLA does with the
// same attention at a few query rows: copy the layer out of the stack, transpose K for its
// dot, and a dozen small ops around the softmax, each a step of the executor.
//
// Work items are (b, kv head) pairs: each reads its keys and values once for all T x (H / Hkv)
// query rows of the group, and the items are spread over XLA's intra-op pool (parallel.h)
// when the layer holds enough to split.

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using l2d::AttendItem;
using l2d::Rows;
constexpr int64_t kMinBytesToSplit = 1 << 18;  // keys + values of a layer, all items

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> layer_b,
                         ffi::ResultBuffer<ffi::F32> out) {
  const int64_t layer = *layer_b.typed_data();
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 3)
    return ffi::Error::InvalidArgument("l2d_attention: needs q (B, T, H, hd), k / v (L, B, Hkv, S, hd), mask (B, T, S)");
  const int64_t B = qd[0], T = qd[1], H = qd[2], hd = qd[3];
  const int64_t L = kd[0], Hkv = kd[2], S = kd[3];
  const auto vd = v.dimensions();
  if (kd[1] != B || kd[4] != hd || Hkv == 0 || H % Hkv != 0 || md[0] != B || md[1] != T || md[2] != S ||
      !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("l2d_attention: shapes of q, k, v and mask do not agree");
  if (layer < 0 || layer >= L) return ffi::Error::InvalidArgument("l2d_attention: layer out of range");
  const int64_t G = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* qp = q.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t item_floats = S * hd;  // one (b, g) slice of k or v
  const float* k0 = k.typed_data() + layer * B * Hkv * item_floats;
  const float* v0 = v.typed_data() + layer * B * Hkv * item_floats;
  const int64_t items = B * Hkv;
  const int64_t bytes = 2 * items * item_floats * static_cast<int64_t>(sizeof(float));
  const int64_t workers = bytes >= kMinBytesToSplit ? l2d::PoolThreads(pool) : 1;
  l2d::ParallelFor(pool, items, workers, [&](int64_t i) {
    const int64_t b = i / Hkv, g = i % Hkv;
    const int64_t first = (b * T * H + g * G) * hd;  // q / out offset of query 0, head g * G
    const Rows rows{qp + first, op + first, mp + b * T * S, T * G, G, hd, H * hd, S};
    AttendItem(rows, k0 + i * item_floats, v0 + i * item_floats, scale);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2dAttentionF32, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
