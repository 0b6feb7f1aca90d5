// Attention of a few query rows over keys / values held in memory (scores and softmax in
// float32): the loops the attention and the decoder-stack kernels share (cpu_attention.cc,
// cpu_decoder.cc).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace l2d {

// The R = T x G query rows of one (b, g) item, in place in q / out / mask: row r is query
// t = r / G, head g * G + r % G.
struct Rows {
  const float* q;    // &q[b, 0, g * G, 0]
  float* out;        // &out[b, 0, g * G, 0]
  const bool* mask;  // &mask[b, 0, 0]
  int64_t R, G, hd, t_stride, S;  // t_stride = H * hd: floats from one query t to the next
  const float* Q(int64_t r) const { return q + (r / G) * t_stride + (r % G) * hd; }
  float* Out(int64_t r) const { return out + (r / G) * t_stride + (r % G) * hd; }
  const bool* Mask(int64_t r) const { return mask + (r / G) * S; }
};

#if defined(__AVX2__) && defined(__FMA__)
// x . k_j for 8 consecutive keys k_0..k_7 (rows of length hd, a multiple of 8): eight vector
// accumulators, summed across lanes all at once (three rounds of pairwise adds).
inline __m256 Dots8(const float* q, const float* k, int64_t hd) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) {
    const __m256 x = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + j * hd + i), a[j]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  // u0 = (k0 k1 k2 k3 | k0 k1 k2 k3) partial sums of the low and high 128-bit halves, u1 for k4..k7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6
// (relative error ~1e-7), times 2^n through the exponent bits; 0 below -87 (where float's
// exp turns denormal; XLA gives values below 1e-38 there).
inline __m256 Exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// Scores of the query rows against keys k (S, hd), times scale, into sc (R, S): keys in
// the outer loop, so each is read once for all rows.
inline void Scores(const Rows& rows, const float* k, float* sc, float scale) {
  const int64_t R = rows.R, S = rows.S, hd = rows.hd;
  int64_t s = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (hd % 8 == 0)
    for (; s + 8 <= S; s += 8)
      for (int64_t r = 0; r < R; ++r)
        _mm256_storeu_ps(sc + r * S + s, _mm256_mul_ps(Dots8(rows.Q(r), k + s * hd, hd), _mm256_set1_ps(scale)));
#endif
  for (; s < S; ++s) {
    const float* __restrict ks = k + s * hd;
    for (int64_t r = 0; r < R; ++r) {
      const float* __restrict q = rows.Q(r);
      float d = 0.0f;
#pragma omp simd reduction(+ : d)
      for (int64_t i = 0; i < hd; ++i) d += q[i] * ks[i];
      sc[r * S + s] = d * scale;
    }
  }
}

// row[s] = exp(row[s] - max) / sum over s: the softmax of one row of scores, in place.
inline void Softmax(float* row, int64_t S) {
  const float mx = *std::max_element(row, row + S);
  int64_t s = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; s + 8 <= S; s += 8) _mm256_storeu_ps(row + s, Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), _mm256_set1_ps(mx))));
#endif
  for (; s < S; ++s) row[s] = std::exp(row[s] - mx);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (s = 0; s < S; ++s) sum += row[s];
#pragma omp simd
  for (s = 0; s < S; ++s) row[s] /= sum;
}

// Out(r) (hd) += sum over s of p[r * S + s] * v[s] (rows of hd floats), for every row: blocks
// of 64 values (16 KiB at hd = 64) stay in L1 while every row adds them up in registers.
inline void AddWeightedValues(const float* p, const float* v, const Rows& rows) {
  constexpr int64_t kBlock = 64;
  const int64_t R = rows.R, S = rows.S, hd = rows.hd;
  for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
    const int64_t s1 = std::min(S, s0 + kBlock);
    for (int64_t r = 0; r < R; ++r) {
      const float* pr = p + r * S;
      int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; c + 64 <= hd; c += 64) {  // 64 outputs in eight vector registers
        float* o = rows.Out(r) + c;
        __m256 a[8];
        for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_ps(o + 8 * j);
        for (int64_t s = s0; s < s1; ++s) {
          const __m256 w = _mm256_set1_ps(pr[s]);
          const float* vs = v + s * hd + c;
          for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + 8 * j, a[j]);
      }
#endif
      float* __restrict o = rows.Out(r);
      for (int64_t s = s0; s < s1; ++s) {
        const float w = pr[s];
        const float* __restrict vs = v + s * hd;
#pragma omp simd
        for (int64_t i = c; i < hd; ++i) o[i] += w * vs[i];
      }
    }
  }
}

// One (b, g) item: its query rows against keys / values k, v (S, hd).
inline void AttendItem(const Rows& rows, const float* k, const float* v, float scale) {
  const int64_t S = rows.S;
  float* sc = ThreadScratch<struct ScoreRows>(rows.R * S);  // R x S floats per thread
  Scores(rows, k, sc, scale);
  for (int64_t r = 0; r < rows.R; ++r) {
    float* row = sc + r * S;
    const bool* mask = rows.Mask(r);
    for (int64_t s = 0; s < S; ++s) row[s] = mask[s] ? row[s] : -FLT_MAX;
    Softmax(row, S);
    std::fill(rows.Out(r), rows.Out(r) + rows.hd, 0.0f);
  }
  AddWeightedValues(sc, v, rows);
}

}  // namespace l2d
