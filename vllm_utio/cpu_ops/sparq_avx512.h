// The fast path of sparq_block_mass (included by sparq_mass.cpp after its helpers): bf16
// or fp16 keys stored token-innermost (a block's channel is one contiguous run, as in the
// CPU backend's 'vec' layout), blocks of 16..128 tokens, on a CPU with AVX-512.
//
// Per block and KV head the chosen channels are read once: straight into registers when
// the KV head has at most 4 query heads (all scored together), else into a small float
// tile scored by groups of heads. Each head's scores of the block stay in registers and
// are reduced at once to the
// block's (max, sum of exp(score - max)), so no row-long score array is written or read
// back; a row's blocks are then combined like flash attention's partial softmaxes.
// Returns false where it does not apply (the general path runs instead).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "avx512_math.h"

#include <limits>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)

// `kHeads` heads' scores of one block (queries `qh`, [kHeads, channels]) reduced to each
// head's (max, sum of exp(score - max)), written at stride `stride`; `load(j, c)` gives
// chunk `c` of the block's `j`-th chosen channel as floats
template <int kHeads, int kChunks, typename Load>
inline void score_block(Load load, const float* qh, int64_t channels, const float* inv_temp,
                        const __mmask16* valid, float* block_max, float* block_sum,
                        int64_t stride) {
  __m512 acc[kHeads][kChunks];
  for (int h = 0; h < kHeads; ++h)
    for (int c = 0; c < kChunks; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < channels; ++j) {
    __m512 k[kChunks];
    for (int c = 0; c < kChunks; ++c) k[c] = load(j, c);
    for (int h = 0; h < kHeads; ++h) {
      const __m512 qv = _mm512_set1_ps(qh[h * channels + j]);
      for (int c = 0; c < kChunks; ++c) acc[h][c] = _mm512_fmadd_ps(qv, k[c], acc[h][c]);
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    const __m512 it = _mm512_set1_ps(inv_temp[h]);
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int c = 0; c < kChunks; ++c) {
      acc[h][c] = _mm512_mul_ps(acc[h][c], it);
      top = _mm512_mask_max_ps(top, valid[c], top, acc[h][c]);
    }
    const float m = _mm512_reduce_max_ps(top);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < kChunks; ++c)
      sum = _mm512_mask_add_ps(sum, valid[c], sum, exp_nonpositive(_mm512_sub_ps(acc[h][c], mv)));
    block_max[h * stride] = m;
    block_sum[h * stride] = _mm512_reduce_add_ps(sum);
  }
}

template <typename scalar_t, int kChunks>
void rank_rows_tiled(const float* query, const scalar_t* cache, int64_t block_stride,
                     int64_t start, int64_t s_head, int64_t s_chan, const int64_t* table,
                     int64_t table_width, const int64_t* lens, int64_t num_heads,
                     int64_t kv_heads, int64_t head_size, int64_t channels, double scale,
                     int64_t width, float* out, int64_t row_begin, int64_t row_end) {
  constexpr int64_t block_size = kChunks * kLanes;
  const int64_t per_kv = num_heads / kv_heads;
  std::vector<int64_t> order(head_size);
  std::vector<float> weight(head_size), qr(per_kv * channels), inv_temp(per_kv);
  std::vector<float> block_max, block_sum;
  alignas(64) float tile[64 * block_size];  // [channels <= 64, block_size]
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t len = lens[r];
    const int64_t nb = (len + block_size - 1) / block_size;
    float* row_out = out + r * width;
    std::fill(row_out, row_out + width, 0.0f);
    if (len <= 0) continue;
    block_max.resize(per_kv * nb);
    block_sum.resize(per_kv * nb);
    const int64_t* row_table = table + r * table_width;
    for (int64_t g = 0; g < kv_heads; ++g) {
      const float* q = query + (r * num_heads + g * per_kv) * head_size;  // [per_kv, D]
      choose_channels(q, per_kv, head_size, channels, scale, order, weight, qr, inv_temp);
      const scalar_t* head_base = cache + start + g * s_head;
      for (int64_t n = 0; n < nb; ++n) {
        if (n + kAhead < nb) {  // blocks sit at random places: ask for a later one now
          const scalar_t* later = head_base + row_table[n + kAhead] * block_stride;
          for (int64_t j = 0; j < channels; ++j)
            for (int64_t s = 0; s < block_size; s += kLine / sizeof(scalar_t))
              __builtin_prefetch(later + order[j] * s_chan + s, 0, 1);
        }
        const scalar_t* base = head_base + row_table[n] * block_stride;
        // lanes past the row's last position (a partial last block) take no part
        const int64_t count = std::min(block_size, len - n * block_size);
        __mmask16 valid[kChunks];
        for (int c = 0; c < kChunks; ++c) {
          const int64_t live = std::clamp<int64_t>(count - c * kLanes, 0, kLanes);
          valid[c] = static_cast<__mmask16>((1u << live) - 1u);
        }
        float* bm = block_max.data() + n;
        float* bsum = block_sum.data() + n;
        const float* ih = inv_temp.data();
        auto from_cache = [&](int64_t j, int c) {
          return load16(base + order[j] * s_chan + c * kLanes);
        };
        // all of a KV head's query heads in one group (the usual GQA ratios): each key
        // is read once straight from the cache
        const float* q0 = qr.data();
        switch (per_kv) {
          case 1: score_block<1, kChunks>(from_cache, q0, channels, ih, valid, bm, bsum, nb);
            continue;
          case 2: score_block<2, kChunks>(from_cache, q0, channels, ih, valid, bm, bsum, nb);
            continue;
          case 3: score_block<3, kChunks>(from_cache, q0, channels, ih, valid, bm, bsum, nb);
            continue;
          case 4: score_block<4, kChunks>(from_cache, q0, channels, ih, valid, bm, bsum, nb);
            continue;
          default: break;
        }
        // more query heads: the chosen channels read once into a float tile, scored by
        // the widest group (up to 4) that divides the heads (their FMA chains interleave)
        for (int64_t j = 0; j < channels; ++j)
          for (int c = 0; c < kChunks; ++c)
            _mm512_store_ps(tile + j * block_size + c * kLanes, from_cache(j, c));
        auto from_tile = [&](int64_t j, int c) {
          return _mm512_load_ps(tile + j * block_size + c * kLanes);
        };
        const int group = per_kv % 4 == 0 ? 4 : per_kv % 3 == 0 ? 3 : per_kv % 2 == 0 ? 2 : 1;
        for (int64_t h = 0; h < per_kv; h += group) {
          const float* qh = qr.data() + h * channels;
          float *m = bm + h * nb, *sm = bsum + h * nb;
          switch (group) {
            case 4: score_block<4, kChunks>(from_tile, qh, channels, ih + h, valid, m, sm, nb);
              break;
            case 3: score_block<3, kChunks>(from_tile, qh, channels, ih + h, valid, m, sm, nb);
              break;
            case 2: score_block<2, kChunks>(from_tile, qh, channels, ih + h, valid, m, sm, nb);
              break;
            default: score_block<1, kChunks>(from_tile, qh, channels, ih + h, valid, m, sm, nb);
          }
        }
      }
      // each head's blocks, rescaled to the row's maximum: its softmax mass per block
      for (int64_t h = 0; h < per_kv; ++h) {
        const float* bm = block_max.data() + h * nb;
        const float* bs = block_sum.data() + h * nb;
        const float top = *std::max_element(bm, bm + nb);
        float total = 0.0f;
        for (int64_t n = 0; n < nb; ++n) total += bs[n] * std::exp(bm[n] - top);
        for (int64_t n = 0; n < nb; ++n)
          row_out[n] = std::max(row_out[n], bs[n] * std::exp(bm[n] - top) / total);
      }
    }
  }
}

#endif  // __AVX512F__

// The fast path where it applies; false: the caller runs the general one.
template <typename scalar_t>
bool rank_rows_fast(const float* query, const scalar_t* cache, int64_t block_stride,
                    int64_t start, int64_t s_tok, int64_t s_head, int64_t s_chan,
                    const int64_t* table, int64_t table_width, const int64_t* lens,
                    int64_t num_heads, int64_t kv_heads, int64_t head_size, int64_t block_size,
                    int64_t channels, double scale, int64_t width, float* out,
                    int64_t row_begin, int64_t row_end) {
#if defined(__AVX512F__)
  constexpr bool half_width =
      std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
  if constexpr (half_width) {
    if (s_tok != 1 || channels > 64) return false;
#define UTIO_TILED(chunks)                                                                  \
  rank_rows_tiled<scalar_t, chunks>(query, cache, block_stride, start, s_head, s_chan, table, \
                                    table_width, lens, num_heads, kv_heads, head_size,        \
                                    channels, scale, width, out, row_begin, row_end)
    switch (block_size) {
      case 16: UTIO_TILED(1); return true;
      case 32: UTIO_TILED(2); return true;
      case 64: UTIO_TILED(4); return true;
      case 128: UTIO_TILED(8); return true;
      default: return false;
    }
#undef UTIO_TILED
  }
#endif
  return false;
}

}  // namespace
