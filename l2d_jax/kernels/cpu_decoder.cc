// Batch-1 (few-row) decoding through a whole stack of decoder layers in one XLA FFI custom
// call (cpu_decoder.py): the main stream of a new token (keys / values written into the
// cache) or the L2D flow stream of an ODE evaluation (reading the main stream's cache).
//
// Args: h (M, H) the stream's input (one row per sequence, one new position each); cos, sin
// (M, hd) its RoPE rotation; mask (M, S) bool the cache slots it attends to; slot () or (M,)
// int32 the cache slot of the new position (of every row, or of each row); k, v
// (L, M, Hkv, S, hd) the stacked cache; modulation
// (L, F, R, H) with R = 1 (shared by the rows) or M: per layer the effective RMSNorm weights
// norm1, norm2 and, with F = 6, the shifts and scales shift1, scale1, shift2, scale2; then 28
// buffers stacked over the L layers (the model's own stacked parameters, read in place): for
// each of q, k, v, o, gate, up, down W (L, K, N), bias (L, N), LoRA A (L, K, r), LoRA B (L, r, N)
// (a size-0 buffer stands for "none"): y = x W + bias + lora_scale (x A) B.
// Attrs: num_heads, eps, lora_scale, write_kv.
// Rets: out (M, H); with write_kv also k, v (aliased to the args k, v: written in place).
//
// Per layer, as DecoderLayer / L2DModel.flow_layer do it:
//   x = rmsnorm(h, norm1) + shift1; q, k, v = projections of x; rope(q), rope(k)
//   [write_kv: k, v into the cache at slot]; a = attention(q, cache[layer], mask)
//   h += scale1 * o(a); x = rmsnorm(h, norm2) + shift2; h += scale2 * down(silu(gate(x)) * up(x))
// (without write_kv the k / v projections are none and nothing is written).
//
// Why one call: a decoding step is reading the weights once; between its matrix products
// XLA runs ~25 small ops per layer, each a step of its executor, and every product or
// attention call wakes the pool's threads again. Here the caller and one task per pool thread
// run the whole stack as a team (parallel.h): each phase (a group's products, finishing them,
// attention) is split over the members and ends in a spinning barrier.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "attention.h"
#include "matvec.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLeading = 8;             // args before the layers' buffers
constexpr int64_t kStacked = 28;             // stacked weight buffers (7 projections x 4)
constexpr int64_t kPhasesPerLayer = 9;       // 4 groups x (products, finish) + attention
enum Proj { kQ, kK, kV, kO, kGate, kUp, kDown, kProjs };

struct Projection {
  const float* w = nullptr;  // (K, N)
  const float* bias = nullptr;
  const float* a = nullptr;  // (K, r)
  const float* b = nullptr;  // (r, N)
  int64_t K = 0, N = 0, r = 0;
};

struct Layer {
  const float *norm1, *norm2, *shift1 = nullptr, *scale1 = nullptr, *shift2 = nullptr, *scale2 = nullptr;
  Projection p[kProjs];
};

// The products of one group of projections that read the same input x (M, K): the W's and
// then the LoRA A's, as one matrix concatenated along N. Block i's result lives at
// buf + M * offset_i as (M, n_i); a row split keeps part p's partial sums at buf + p * M * total.
struct Group {
  struct Block {
    const float* w;
    int64_t n, offset;
  };
  Block blocks[2 * kProjs];
  int nblocks = 0;
  int block[kProjs], lora[kProjs];  // a projection's W block and LoRA A block (-1: none)
  int64_t K = 0, total = 0, parts = 1;
  bool split_rows = false;
  float* buf = nullptr;

  Group(std::initializer_list<int> projs, const Projection* p, float* scratch, int64_t threads) : buf(scratch) {
    std::fill(block, block + kProjs, -1);
    std::fill(lora, lora + kProjs, -1);
    K = p[*projs.begin()].K;
    for (int j : projs)
      if (p[j].w) block[j] = Add(p[j].w, p[j].N);
    for (int j : projs)
      if (p[j].a) lora[j] = Add(p[j].a, p[j].r);
    parts = l2d::Parts(K * total * static_cast<int64_t>(sizeof(float)), threads);
    split_rows = l2d::SplitRows(total, parts);
  }
  int Add(const float* w, int64_t n) {
    blocks[nblocks] = {w, n, total};
    total += n;
    return nblocks++;
  }
  float* Out(int b, int64_t part, int64_t M) const { return buf + (part * total + blocks[b].offset) * M; }
};

// x = RMSNorm of h with weight w, then + shift: h, x (M, H); w, shift (R, H), R = 1 or M
// (row m reads row m % R).
void NormRows(const float* h, const float* w, const float* shift, int64_t R, float* x, int64_t M, int64_t H,
              float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* hm = h + m * H;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += hm[i] * hm[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    const float* wm = w + (m % R) * H;
    float* xm = x + m * H;
    for (int64_t i = 0; i < H; ++i) xm[i] = wm[i] * (hm[i] * inv);
    if (shift)
      for (int64_t i = 0; i < H; ++i) xm[i] += shift[(m % R) * H + i];
  }
}

// Part p of a group's products of x (M, K).
void Products(const Group& g, const float* x, int64_t M, int64_t p) {
  if (g.split_rows) {
    const auto [k0, k1] = l2d::Share(g.K, g.parts, p, 4);
    for (int i = 0; i < g.nblocks; ++i)
      l2d::AccumulateKN(x, g.blocks[i].w, g.Out(i, p, M), M, g.K, g.blocks[i].n, k0, k1, 0, g.blocks[i].n,
                        g.blocks[i].n, /*zero=*/true);
    return;
  }
  const auto [v0, v1] = l2d::Share(g.total, g.parts, p, 16);
  for (int i = 0; i < g.nblocks; ++i) {
    const auto& b = g.blocks[i];
    const int64_t n0 = std::max(v0, b.offset) - b.offset, n1 = std::min(v1, b.offset + b.n) - b.offset;
    if (n0 < n1) l2d::AccumulateKN(x, b.w, g.Out(i, 0, M), M, g.K, b.n, 0, g.K, n0, n1, b.n, /*zero=*/true);
  }
}

// Columns [c0, c1) of projection j of the group: y = the parts' partial sums added up
// + bias + lora_scale * (x A) B, in place in part 0. Returns y (M, N).
float* Finish(const Group& g, const Projection& pr, int j, int64_t M, int64_t c0, int64_t c1, float lora_scale) {
  const int b = g.block[j], lora = g.lora[j];
  const int64_t n = g.blocks[b].n, sums = g.split_rows ? g.parts : 1;
  float* y = g.Out(b, 0, M);
  for (int64_t p = 1; p < sums; ++p) {
    const float* src = g.Out(b, p, M);
    for (int64_t m = 0; m < M; ++m)
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) y[m * n + c] += src[m * n + c];
  }
  if (pr.bias)
    for (int64_t m = 0; m < M; ++m)
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) y[m * n + c] += pr.bias[c];
  if (lora < 0) return y;
  const int64_t r = pr.r, w = c1 - c0;
  float xa[64];  // x A of one row, summed over the parts (r <= 64, checked)
  float* delta = l2d::ThreadScratch<struct LoraDelta>(w);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < r; ++i) {
      float s = 0.0f;
      for (int64_t p = 0; p < sums; ++p) s += g.Out(lora, p, M)[m * r + i];
      xa[i] = s;
    }
    std::fill(delta, delta + w, 0.0f);
    for (int64_t i = 0; i < r; ++i) {  // (x A) B along rows of B
      const float a = xa[i];
      const float* __restrict bi = pr.b + i * n + c0;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) delta[c] += a * bi[c];
    }
    float* __restrict ym = y + m * n + c0;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) ym[c] += delta[c] * lora_scale;
  }
  return y;
}

// Rotate-half RoPE of one head x (hd) with cos / sin (hd), in place.
void Rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  float tmp[512];
  std::copy(x, x + hd, tmp);
  for (int64_t i = 0; i < hd; ++i) x[i] = tmp[i] * cos[i] + (i < half ? -tmp[i + half] : tmp[i - half]) * sin[i];
}

// g[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] for i < n.
void SwiGLU(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = l2d::Exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// h[:, c0:c1] += scale * y[:, c0:c1]: h, y (M, H); scale (R, H) as in NormRows, or none (1).
void AddScaled(float* h, const float* y, const float* scale, int64_t R, int64_t M, int64_t H, int64_t c0,
               int64_t c1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = c0; c < c1; ++c) h[m * H + c] += (scale ? scale[(m % R) * H + c] : 1.0f) * y[m * H + c];
}

ffi::Error Fail(const std::string& what) { return ffi::Error::InvalidArgument("l2d_decoder: " + what); }

ffi::Error DecoderImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t num_heads,
                       float eps, float lora_scale, bool write_kv) {
  auto f32 = [&](size_t i) { return args.get<ffi::AnyBuffer>(i); };
  if (args.size() != kLeading + kStacked) return Fail("expected 8 + 28 args");
  auto h_in = f32(0), cos_b = f32(1), sin_b = f32(2), mask_b = f32(3), slot_b = f32(4);
  auto k_in = f32(5), v_in = f32(6), mod_b = f32(7);
  if (!h_in.has_value() || !k_in.has_value() || !v_in.has_value() || !mask_b.has_value() || !slot_b.has_value() ||
      !cos_b.has_value() || !sin_b.has_value() || !mod_b.has_value())
    return Fail("bad leading args");
  const auto hd_ = h_in->dimensions(), kd = k_in->dimensions();
  if (hd_.size() != 2 || kd.size() != 5) return Fail("h must be (M, H) and k / v (L, M, Hkv, S, hd)");
  const int64_t L = kd[0], M = hd_[0], H = hd_[1], Hkv = kd[2], S = kd[3], hd = kd[4];
  if (kd[1] != M || num_heads % Hkv != 0 || hd > 512 || hd % 2 != 0)
    return Fail("cache shape, layer count or head counts do not agree");
  if (mask_b->element_type() != ffi::DataType::PRED || slot_b->element_type() != ffi::DataType::S32)
    return Fail("mask must be bool and slot int32");
  for (const auto& b : {*h_in, *cos_b, *sin_b, *k_in, *v_in, *mod_b})
    if (b.element_type() != ffi::DataType::F32) return Fail("h, cos, sin, k, v and the modulation must be float32");
  const auto md = mod_b->dimensions();
  if (md.size() != 4 || md[0] != L || (md[1] != 2 && md[1] != 6) || (md[2] != 1 && md[2] != M) || md[3] != H)
    return Fail("modulation must be (L, 2 or 6, 1 or M, H)");
  const int64_t F = md[1], R = md[2];
  const float* modp = reinterpret_cast<const float*>(mod_b->untyped_data());
  if (mask_b->dimensions().size() != 2 || mask_b->dimensions()[0] != M || mask_b->dimensions()[1] != S ||
      cos_b->element_count() != M * hd || sin_b->element_count() != M * hd)
    return Fail("mask must be (M, S) and cos / sin (M, hd)");
  const int64_t slot_count = slot_b->element_count();
  if (slot_count != 1 && slot_count != M) return Fail("slot must be () or (M,)");
  const int32_t* slot_p = reinterpret_cast<const int32_t*>(slot_b->untyped_data());
  auto slot = [&](int64_t m) -> int64_t { return slot_p[slot_count == 1 ? 0 : m]; };
  for (int64_t m = 0; write_kv && m < slot_count; ++m)
    if (slot_p[m] < 0 || slot_p[m] >= S) return Fail("slot outside the cache");
  if (rets.size() != (write_kv ? 3u : 1u)) return Fail("expected out (and k, v with write_kv)");
  auto out_b = rets.get<ffi::AnyBuffer>(0);
  if (!out_b.has_value()) return Fail("bad result");
  float* out = reinterpret_cast<float*>((*out_b)->untyped_data());
  float* kc = reinterpret_cast<float*>(k_in->untyped_data());
  float* vc = reinterpret_cast<float*>(v_in->untyped_data());
  if (write_kv) {  // aliased: read and write the results (XLA may have copied the args into them)
    auto kr = rets.get<ffi::AnyBuffer>(1), vr = rets.get<ffi::AnyBuffer>(2);
    if (!kr.has_value() || !vr.has_value()) return Fail("bad cache results");
    kc = reinterpret_cast<float*>((*kr)->untyped_data());
    vc = reinterpret_cast<float*>((*vr)->untyped_data());
  }
  const float* cosp = reinterpret_cast<const float*>(cos_b->untyped_data());
  const float* sinp = reinterpret_cast<const float*>(sin_b->untyped_data());
  const bool* maskp = reinterpret_cast<const bool*>(mask_b->untyped_data());

  // the layers' buffers, checked against the shapes they must have
  std::vector<Layer> layers(L);
  const int64_t Hq = num_heads * hd, Hk = Hkv * hd;
  for (int64_t l = 0; l < L; ++l) {
    bool wrong_type = false;
    // layer l's slice of stacked buffer i (L, ...), or nullptr for a size-0 "none"
    auto ptr = [&](size_t i) -> const float* {
      auto b = f32(kLeading + i);
      if (!b.has_value() || b->element_count() == 0) return nullptr;
      wrong_type |= b->element_type() != ffi::DataType::F32;
      return reinterpret_cast<const float*>(b->untyped_data()) + l * (b->element_count() / L);
    };
    auto dims = [&](size_t i) { return f32(kLeading + i)->dimensions(); };
    Layer& ly = layers[l];
    const float* field = modp + l * F * R * H;  // (F, R, H)
    ly.norm1 = field, ly.norm2 = field + R * H;
    if (F == 6) ly.shift1 = field + 2 * R * H, ly.scale1 = field + 3 * R * H, ly.shift2 = field + 4 * R * H,
                ly.scale2 = field + 5 * R * H;
    const int64_t in[kProjs] = {H, H, H, Hq, H, H, 0}, outn[kProjs] = {Hq, Hk, Hk, H, 0, 0, H};
    int64_t inter = -1;
    for (int j = 0; j < kProjs; ++j) {
      Projection& pr = ly.p[j];
      const size_t o = 4 * j;
      pr.w = ptr(o), pr.bias = ptr(o + 1), pr.a = ptr(o + 2), pr.b = ptr(o + 3);
      if (!pr.w) {
        if (j == kK || j == kV) {
          if (write_kv) return Fail("write_kv needs the k and v projections");
          continue;
        }
        return Fail("a projection weight is missing");
      }
      auto wd = dims(o);
      if (wd.size() != 3 || wd[0] != L) return Fail("projection weights must be (L, K, N)");
      pr.K = wd[1], pr.N = wd[2];
      if (j == kGate) inter = pr.N;
      const int64_t want_in = j == kDown ? inter : in[j], want_out = (j == kGate || j == kUp) ? inter : outn[j];
      if (pr.K != want_in || pr.N != want_out) return Fail("a projection has the wrong shape");
      if (pr.bias && f32(kLeading + o + 1)->element_count() != L * pr.N) return Fail("a bias has the wrong size");
      if ((pr.a == nullptr) != (pr.b == nullptr)) return Fail("a LoRA needs both A and B");
      if (pr.a) {
        auto ad = dims(o + 2), bd = dims(o + 3);
        if (ad.size() != 3 || bd.size() != 3 || ad[0] != L || bd[0] != L) return Fail("LoRA factors must be (L, K, r) and (L, r, N)");
        pr.r = ad[2];
        if (ad[1] != pr.K || bd[1] != pr.r || bd[2] != pr.N || pr.r > 64) return Fail("LoRA factors of the wrong shape (rank <= 64)");
      }
    }
    if (wrong_type) return Fail("every weight must be float32");
  }
  const int64_t inter = layers[0].p[kGate].N, threads = l2d::PoolThreads(pool);
  for (const Layer& ly : layers)
    if (ly.p[kGate].N != inter) return Fail("layers of different MLP widths");

  // scratch: the groups' products (one region, reused group after group; down has its own so
  // that it can read silu(gate) * up, kept in the gate/up group's results), q's attention output
  const int64_t widest = std::max({Hq + 2 * Hk + 3 * 64, H + 64, 2 * inter + 2 * 64});
  std::vector<float> scratch(threads * M * (widest + H + 64) + M * Hq);
  float* region = scratch.data();
  float* down_region = region + threads * M * widest;
  float* abuf = down_region + threads * M * (H + 64);  // attention output (M, Hq)
  struct Groups {
    Group qkv, o, gu, dn;
  };
  std::vector<Groups> groups;
  groups.reserve(L);
  for (const Layer& ly : layers)
    groups.push_back({Group({kQ, kK, kV}, ly.p, region, threads), Group({kO}, ly.p, region, threads),
                      Group({kGate, kUp}, ly.p, region, threads), Group({kDown}, ly.p, down_region, threads)});
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t G = num_heads / Hkv, heads = num_heads + (write_kv ? 2 * Hkv : 0);
  const float* h0 = reinterpret_cast<const float*>(h_in->untyped_data());
  std::copy(h0, h0 + M * H, out);
  float* h = out;  // the stream, updated in place

  auto program = [&](l2d::Team& team) {
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers[l];
      const Group &qkv = groups[l].qkv, &o = groups[l].o, &gu = groups[l].gu, &dn = groups[l].dn;
      // attention: q, k, v of x = rmsnorm(h, norm1) + shift1
      team.Phase(qkv.parts, [&](int64_t p) {
        float* x = l2d::ThreadScratch<struct GroupInput>(M * H);
        NormRows(h, ly.norm1, ly.shift1, R, x, M, H, eps);
        Products(qkv, x, M, p);
      });
      team.Phase(qkv.parts, [&](int64_t p) {  // whole heads: bias, LoRA, RoPE, into the cache
        const auto [h0, h1] = l2d::Share(heads, qkv.parts, p, 1);
        for (int64_t hh = h0; hh < h1; ++hh) {
          const int j = hh < num_heads ? kQ : (hh < num_heads + Hkv ? kK : kV);
          const int64_t head = j == kQ ? hh : hh - num_heads - (j == kK ? 0 : Hkv);
          float* y = Finish(qkv, ly.p[j], j, M, head * hd, (head + 1) * hd, lora_scale);
          const int64_t n = ly.p[j].N;
          for (int64_t m = 0; m < M; ++m) {
            float* x = y + m * n + head * hd;
            if (j != kV) Rope(x, cosp + m * hd, sinp + m * hd, hd);
            if (j != kQ) std::copy(x, x + hd, (j == kK ? kc : vc) + (((l * M + m) * Hkv + head) * S + slot(m)) * hd);
          }
        }
      });
      const float* q = qkv.Out(qkv.block[kQ], 0, M);
      team.Phase(M * Hkv, [&](int64_t i) {
        const int64_t m = i / Hkv, g = i % Hkv, first = (m * num_heads + g * G) * hd;
        const l2d::Rows rows{q + first, abuf + first, maskp + m * S, G, G, hd, num_heads * hd, S};
        const int64_t item = ((l * M + m) * Hkv + g) * S * hd;
        l2d::AttendItem(rows, kc + item, vc + item, scale);
      });
      // h += scale1 * o(a)
      team.Phase(o.parts, [&](int64_t p) { Products(o, abuf, M, p); });
      team.Phase(o.parts, [&](int64_t p) {
        const auto [c0, c1] = l2d::Share(H, o.parts, p, 16);
        AddScaled(h, Finish(o, ly.p[kO], kO, M, c0, c1, lora_scale), ly.scale1, R, M, H, c0, c1);
      });
      // h += scale2 * down(silu(gate(x)) * up(x)), x = rmsnorm(h, norm2) + shift2
      team.Phase(gu.parts, [&](int64_t p) {
        float* x = l2d::ThreadScratch<struct GroupInput>(M * H);
        NormRows(h, ly.norm2, ly.shift2, R, x, M, H, eps);
        Products(gu, x, M, p);
      });
      float* act = gu.Out(gu.block[kGate], 0, M);  // silu(gate) * up, in place of gate: (M, inter)
      team.Phase(gu.parts, [&](int64_t p) {
        const auto [c0, c1] = l2d::Share(inter, gu.parts, p, 16);
        Finish(gu, ly.p[kGate], kGate, M, c0, c1, lora_scale);
        const float* up = Finish(gu, ly.p[kUp], kUp, M, c0, c1, lora_scale);
        for (int64_t m = 0; m < M; ++m) SwiGLU(act + m * inter + c0, up + m * inter + c0, c1 - c0);
      });
      team.Phase(dn.parts, [&](int64_t p) { Products(dn, act, M, p); });
      team.Phase(dn.parts, [&](int64_t p) {
        const auto [c0, c1] = l2d::Share(H, dn.parts, p, 16);
        AddScaled(h, Finish(dn, ly.p[kDown], kDown, M, c0, c1, lora_scale), ly.scale2, R, M, H, c0, c1);
      });
    }
  };
  l2d::RunTeam(pool, threads, L * kPhasesPerLayer, program);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2dDecoderF32, DecoderImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<float>("eps")
                                  .Attr<float>("lora_scale")
                                  .Attr<bool>("write_kv"));
