// bf16 pair dot products (AVX512-BF16 `vdpbf16ps`) for the decode attention op: one
// instruction multiplies 32 bf16 pairs and adds them into 16 floats, half the instructions
// of widening to float and fusing multiply-adds. On a Zen 4 (AVX-512 on 256-bit halves)
// the op is bound by those instructions, not by memory, so this is its main cost.
//
// vdpbf16ps pairs neighbouring bf16 values of a 32-bit lane. The cache stores K
// channel-major (pairs wanted along channels) and V token-major (pairs wanted along
// tokens), so two rows are interleaved with unpacklo/hi, which work per 128-bit lane:
// of rows a and b of 32 values, lo holds the pairs (a[i], b[i]) for i in 0-3, 8-11, 16-19,
// 24-27 and hi for the other 16. Scores are put back in token order before they are
// stored; values stay in that channel order through the whole row (see dot_channel).
#pragma once

#include "avx512_math.h"

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AVX512BF16__)
#define UTIO_HAS_DOT 1

inline __m512 dot_pairs(__m512 acc, __m512i pairs, __m512i broadcast) {
  return _mm512_dpbf16_ps(acc, (__m512bh)pairs, (__m512bh)broadcast);
}

// Channel (within 32) held by float lane `lane` of the lo (half 0) or hi (half 1) register.
inline int64_t dot_channel(int64_t half, int64_t lane) {
  return 8 * (lane / 4) + 4 * half + lane % 4;
}

// scores of `kNum` query vectors (`q`: bf16 pairs along channels, [kNum][dim / 2]) against
// the 32 tokens of `k` (channel c of token t at k[c * k_chan + t]), times `scale`
template <int kNum>
inline void score_tile_dot(const uint32_t* q, const uint16_t* k, int64_t k_chan, int64_t dim,
                           float scale, float* score, int64_t score_stride) {
  __m512 lo[kNum], hi[kNum];
  for (int v = 0; v < kNum; ++v) lo[v] = hi[v] = _mm512_setzero_ps();
  const int64_t pairs = dim / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const __m512i a = _mm512_loadu_si512(k + 2 * j * k_chan);
    const __m512i b = _mm512_loadu_si512(k + (2 * j + 1) * k_chan);
    const __m512i kl = _mm512_unpacklo_epi16(a, b), kh = _mm512_unpackhi_epi16(a, b);
    for (int v = 0; v < kNum; ++v) {
      const __m512i qv = _mm512_set1_epi32(static_cast<int>(q[v * pairs + j]));
      lo[v] = dot_pairs(lo[v], kl, qv);
      hi[v] = dot_pairs(hi[v], kh, qv);
    }
  }
  // token order: tokens 0-15 are lo[0:4] hi[0:4] lo[4:8] hi[4:8], 16-31 the rest
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11,
                                          10, 9, 8);
  const __m512 s = _mm512_set1_ps(scale);
  for (int v = 0; v < kNum; ++v) {
    float* out = score + v * score_stride;
    _mm512_storeu_ps(out, _mm512_mul_ps(s, _mm512_permutex2var_ps(lo[v], first, hi[v])));
    _mm512_storeu_ps(out + kLanes, _mm512_mul_ps(s, _mm512_permutex2var_ps(lo[v], second, hi[v])));
  }
}

// score[v][t] for every vector and token of a block (block_size: a multiple of 32)
inline void score_all_dot(const uint32_t* q, const uint16_t* k, int64_t k_chan, int64_t dim,
                          int64_t block_size, float scale, float* score, int64_t vectors) {
  const int64_t pairs = dim / 2;
  for (int64_t v0 = 0; v0 < vectors; v0 += 8) {  // 8 vectors: 16 accumulators
    const uint32_t* qv = q + v0 * pairs;
    float* s = score + v0 * block_size;
    for (int64_t t = 0; t < block_size; t += 32) {
      with_count<8>(std::min<int64_t>(8, vectors - v0), [&](auto n) {
        score_tile_dot<decltype(n)::value>(qv, k + t, k_chan, dim, scale, s + t, block_size);
      });
    }
  }
}

// out[v] += sum_t w[v][t] * V[t] over `count` tokens, w as bf16 pairs along tokens
// ([kNum][w_stride] pairs; an odd count's last pair has a zero weight), out in the
// channel order of dot_channel; dim = 32 * kHalves
template <int kNum, int kHalves>
inline void accumulate_dot(const uint32_t* w, int64_t w_stride, const uint16_t* vals,
                           int64_t v_tok, int64_t count, float* out) {
  constexpr int kRegs = 2 * kHalves;
  __m512 acc[kNum][kRegs];
  for (int v = 0; v < kNum; ++v)
    for (int c = 0; c < kRegs; ++c) acc[v][c] = _mm512_loadu_ps(out + (v * kRegs + c) * kLanes);
  for (int64_t t = 0; t < count; t += 2) {
    const bool single = t + 1 == count;  // the row after the last token may be stale
    __m512i x[kRegs];
    for (int h = 0; h < kHalves; ++h) {
      const __m512i a = _mm512_loadu_si512(vals + t * v_tok + 32 * h);
      const __m512i b = single ? _mm512_setzero_si512()
                               : _mm512_loadu_si512(vals + (t + 1) * v_tok + 32 * h);
      x[2 * h] = _mm512_unpacklo_epi16(a, b);
      x[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
    }
    for (int v = 0; v < kNum; ++v) {
      const __m512i wv = _mm512_set1_epi32(static_cast<int>(w[v * w_stride + t / 2]));
      for (int c = 0; c < kRegs; ++c) acc[v][c] = dot_pairs(acc[v][c], x[c], wv);
    }
  }
  for (int v = 0; v < kNum; ++v)
    for (int c = 0; c < kRegs; ++c) _mm512_storeu_ps(out + (v * kRegs + c) * kLanes, acc[v][c]);
}

template <int kHalves>
void accumulate_all_dot(const uint32_t* w, int64_t w_stride, const uint16_t* vals,
                        int64_t v_tok, int64_t count, float* out, int64_t vectors) {
  constexpr int kGroup = kHalves == 2 ? 5 : 2;  // accumulators + V pairs fit 32 registers
  constexpr int64_t dim = 32 * kHalves;
  for (int64_t v0 = 0; v0 < vectors; v0 += kGroup) {
    const uint32_t* wv = w + v0 * w_stride;
    float* o = out + v0 * dim;
    with_count<kGroup>(std::min<int64_t>(kGroup, vectors - v0), [&](auto n) {
      accumulate_dot<decltype(n)::value, kHalves>(wv, w_stride, vals, v_tok, count, o);
    });
  }
}

// a block's softmax weights (floats, zero past each vector's positions) as bf16 pairs
inline void weights_to_pairs(const float* score, int64_t block_size, int64_t vectors,
                             uint16_t* w) {
  for (int64_t v = 0; v < vectors; ++v)
    for (int64_t t = 0; t < block_size; t += kLanes) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(score + v * block_size + t));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + v * block_size + t), (__m256i)h);
    }
}

#endif  // __AVX512BF16__

}  // namespace
