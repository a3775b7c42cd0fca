// Paged attention for decode-like rows (a few query tokens per row) over vLLM's CPU KV
// cache in its 'vec' layout: per block and KV head, K stored channel-major (a channel's
// tokens contiguous) and V token-major (a token's channels contiguous).
//
// Why UTIO has its own: on this machine vLLM 0.32's CPU kernel reads the cache at about
// 6 GB/s for one query token per row and costs 2-4.5x that for 2-5 tokens (it walks the
// cache once per query token), so restricted block tables (select) and verification
// passes (speculation) leave speed behind. Here each row and KV head reads every block of
// its table once for all of its query vectors (query heads of the group x query tokens,
// up to 16): scores of a block in registers, an online softmax per vector (flash
// attention's running max and sum), V accumulated in float; blocks further down the table
// are prefetched (they sit at random places of the pool). bf16 caches run on AVX512-BF16
// dot products where the CPU has them (bf16_dot.h). Query token i of a row with q
// tokens sees the first len - (q - 1 - i) positions (causal within the row, as vLLM).
// One thread: vLLM's CPU worker runs its forward on one OpenMP thread here.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "avx512_math.h"
#include "bf16_dot.h"

namespace {

constexpr int64_t kMaxVectors = 16;  // query vectors per row and KV head
constexpr int64_t kAheadBlocks = 4;  // blocks prefetched ahead
constexpr int64_t kLineBytes = 64;

struct Layout {  // element offsets inside one block, from the backend's own write
  int64_t block_stride, k_start, k_head, k_chan, v_start, v_head, v_tok;
};

#if defined(__AVX512F__)

// scores of `kNum` query vectors (`q`, [kNum][dim], pre-scaled) against the block's
// tokens [t0, t0 + 16 * kChunks): score[v][t] = q[v] . K[t]
template <typename scalar_t, int kNum, int kChunks>
inline void score_tile(const float* q, const scalar_t* k, int64_t k_chan, int64_t dim,
                       float* score, int64_t score_stride) {
  __m512 acc[kNum][kChunks];
  for (int v = 0; v < kNum; ++v)
    for (int c = 0; c < kChunks; ++c) acc[v][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    __m512 kv[kChunks];
    for (int c = 0; c < kChunks; ++c) kv[c] = load16(k + d * k_chan + c * kLanes);
    for (int v = 0; v < kNum; ++v) {
      const __m512 qv = _mm512_set1_ps(q[v * dim + d]);
      for (int c = 0; c < kChunks; ++c) acc[v][c] = _mm512_fmadd_ps(qv, kv[c], acc[v][c]);
    }
  }
  for (int v = 0; v < kNum; ++v)
    for (int c = 0; c < kChunks; ++c)
      _mm512_storeu_ps(score + v * score_stride + c * kLanes, acc[v][c]);
}

template <typename scalar_t, int kNum>
inline void score_block(const float* q, const scalar_t* k, int64_t k_chan, int64_t dim,
                        int64_t block_size, float* score) {
  int64_t t = 0;
  for (; t + 32 <= block_size; t += 32)
    score_tile<scalar_t, kNum, 2>(q, k + t, k_chan, dim, score + t, block_size);
  for (; t < block_size; t += 16)
    score_tile<scalar_t, kNum, 1>(q, k + t, k_chan, dim, score + t, block_size);
}

// out[v] += sum_t w[v][t] * V[t] for `kNum` vectors; dim = 16 * kDimChunks
template <typename scalar_t, int kNum, int kDimChunks>
inline void accumulate_values(const float* w, int64_t w_stride, const scalar_t* vals,
                              int64_t v_tok, int64_t count, float* out) {
  __m512 acc[kNum][kDimChunks];
  for (int v = 0; v < kNum; ++v)
    for (int c = 0; c < kDimChunks; ++c) acc[v][c] = _mm512_loadu_ps(out + (v * kDimChunks + c) * kLanes);
  for (int64_t t = 0; t < count; ++t) {
    __m512 x[kDimChunks];
    for (int c = 0; c < kDimChunks; ++c) x[c] = load16(vals + t * v_tok + c * kLanes);
    for (int v = 0; v < kNum; ++v) {
      const __m512 wv = _mm512_set1_ps(w[v * w_stride + t]);
      for (int c = 0; c < kDimChunks; ++c) acc[v][c] = _mm512_fmadd_ps(wv, x[c], acc[v][c]);
    }
  }
  for (int v = 0; v < kNum; ++v)
    for (int c = 0; c < kDimChunks; ++c) _mm512_storeu_ps(out + (v * kDimChunks + c) * kLanes, acc[v][c]);
}

template <typename scalar_t, int kDimChunks>
void accumulate_all(const float* w, int64_t w_stride, const scalar_t* vals, int64_t v_tok,
                    int64_t count, float* out, int64_t vectors) {
  // register budget: at most 24 accumulators (the rest hold V and a weight)
  constexpr int kGroup = 24 / kDimChunks;
  constexpr int64_t dim = kDimChunks * kLanes;
  for (int64_t v0 = 0; v0 < vectors; v0 += kGroup) {
    const float* wv = w + v0 * w_stride;
    float* o = out + v0 * dim;
    with_count<kGroup>(std::min<int64_t>(kGroup, vectors - v0), [&](auto n) {
      constexpr int kNum = decltype(n)::value;
      accumulate_values<scalar_t, kNum, kDimChunks>(wv, w_stride, vals, v_tok, count, o);
    });
  }
}

template <typename scalar_t>
void score_all(const float* q, const scalar_t* k, int64_t k_chan, int64_t dim,
               int64_t block_size, float* score, int64_t vectors) {
  for (int64_t v0 = 0; v0 < vectors; v0 += 8) {  // 8 vectors x 32 tokens: 16 accumulators
    const float* qv = q + v0 * dim;
    float* s = score + v0 * block_size;
    with_count<8>(std::min<int64_t>(8, vectors - v0), [&](auto n) {
      score_block<scalar_t, decltype(n)::value>(qv, k, k_chan, dim, block_size, s);
    });
  }
}

// into L2 (prefetcht2), not L1: on a Zen 4, 128 L1 prefetches per block and head stalled
// the loads they ran ahead of; into L2 a 4k row took 0.62-0.66x the time (1 token)
inline void prefetch_region(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += kLineBytes) __builtin_prefetch(c + b, 0, 1);
}

// Query vectors of one row and KV head, in the form the block loop reads them.
struct Queries {
  const float* scaled;    // [vectors][dim] floats times the scale (float path)
  const uint32_t* pairs;  // [vectors][dim / 2] bf16 pairs, unscaled (dot path), or null
  float scale;
};

// One row and KV head: `vectors` query vectors, vector v seeing the first `visible[v]`
// positions; writes each vector's output (float) to `out`, in channel order, or on the
// dot path in dot_channel's order. `w`: room for [vectors][block_size] bf16 weights.
template <typename scalar_t, typename index_t>
void attend_group(const Queries& q, const int64_t* visible, int64_t vectors,
                  const scalar_t* cache, const Layout& lay, int64_t g, const index_t* table,
                  int64_t block_size, int64_t dim, float* score, uint16_t* w, float* out) {
  float run_max[kMaxVectors], run_sum[kMaxVectors];
  for (int64_t v = 0; v < vectors; ++v) {
    run_max[v] = -std::numeric_limits<float>::infinity();
    run_sum[v] = 0.0f;
  }
  std::fill(out, out + vectors * dim, 0.0f);
  const int64_t longest = *std::max_element(visible, visible + vectors);
  const int64_t blocks = (longest + block_size - 1) / block_size;
  const int64_t k_bytes = dim * block_size * sizeof(scalar_t);  // one head's K (= its V)
  const bool contiguous = lay.k_chan == block_size;  // K of a head: one run of bytes
  auto head_k = [&](int64_t n) {
    return cache + table[n] * lay.block_stride + lay.k_start + g * lay.k_head;
  };
  auto head_v = [&](int64_t n) {
    return cache + table[n] * lay.block_stride + lay.v_start + g * lay.v_head;
  };
  for (int64_t n = 0; n < std::min(kAheadBlocks, blocks); ++n) {
    if (!contiguous) break;
    prefetch_region(head_k(n), k_bytes);
    prefetch_region(head_v(n), k_bytes);
  }
  for (int64_t n = 0; n < blocks; ++n) {
    // a coming block's K and V are asked for in four parts spread over this block's work,
    // not in one burst of 128 lines: a burst filled the miss queue and the prefetch
    // instructions themselves waited; spread out, an 8k row took 0.74x the time with 5
    // query tokens and 0.65x with 1 (Zen 4)
    const bool ahead = n + kAheadBlocks < blocks && contiguous;
    const char* next_k = ahead ? reinterpret_cast<const char*>(head_k(n + kAheadBlocks)) : nullptr;
    const char* next_v = ahead ? reinterpret_cast<const char*>(head_v(n + kAheadBlocks)) : nullptr;
    const int64_t half = k_bytes / 2;
    if (ahead) prefetch_region(next_k, half);
    const int64_t t0 = n * block_size;
    const int64_t count = std::min(block_size, longest - t0);
#if defined(UTIO_HAS_DOT)
    if (q.pairs != nullptr)
      score_all_dot(q.pairs, reinterpret_cast<const uint16_t*>(head_k(n)), lay.k_chan, dim,
                    block_size, q.scale, score, vectors);
    else
#endif
      score_all(q.scaled, head_k(n), lay.k_chan, dim, block_size, score, vectors);
    if (ahead) prefetch_region(next_k + half, k_bytes - half);
    for (int64_t v = 0; v < vectors; ++v) {
      float* s = score + v * block_size;
      const int64_t live = std::clamp<int64_t>(visible[v] - t0, 0, block_size);
      __m512 high = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < live; t += kLanes) {
        const int64_t lanes = std::min<int64_t>(live - t, kLanes);
        const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
        high = _mm512_mask_max_ps(high, mask, high, _mm512_loadu_ps(s + t));
      }
      const float top = _mm512_reduce_max_ps(high);
      if (live == 0) {  // the whole block is past this vector's positions
        std::fill(s, s + block_size, 0.0f);
        continue;
      }
      const float m = std::max(run_max[v], top);
      const float shrink = std::exp(run_max[v] - m);  // 0 on the first block
      const __m512 mv = _mm512_set1_ps(m);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < block_size; t += kLanes) {
        const int64_t lanes = std::clamp<int64_t>(live - t, 0, kLanes);
        const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
        const __m512 e = _mm512_maskz_mov_ps(
            mask, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv)));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
      }
      run_sum[v] = run_sum[v] * shrink + _mm512_reduce_add_ps(sum);
      run_max[v] = m;
      if (shrink != 1.0f) {
        float* o = out + v * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] *= shrink;
      }
    }
    if (ahead) prefetch_region(next_v, half);
#if defined(UTIO_HAS_DOT)
    if (q.pairs != nullptr) {
      weights_to_pairs(score, block_size, vectors, w);
      const auto* pairs = reinterpret_cast<const uint32_t*>(w);
      const auto* vals = reinterpret_cast<const uint16_t*>(head_v(n));
      if (dim == 64)
        accumulate_all_dot<2>(pairs, block_size / 2, vals, lay.v_tok, count, out, vectors);
      else
        accumulate_all_dot<4>(pairs, block_size / 2, vals, lay.v_tok, count, out, vectors);
    } else
#endif
    if (dim == 64)
      accumulate_all<scalar_t, 4>(score, block_size, head_v(n), dim, count, out, vectors);
    else
      accumulate_all<scalar_t, 8>(score, block_size, head_v(n), dim, count, out, vectors);
    if (ahead) prefetch_region(next_v + half, k_bytes - half);
  }
  for (int64_t v = 0; v < vectors; ++v) {
    const float inv = run_sum[v] > 0.0f ? 1.0f / run_sum[v] : 0.0f;
    for (int64_t d = 0; d < dim; ++d) out[v * dim + d] *= inv;
  }
}

// Whether rows of this dtype and block size run on bf16 pair dot products (bf16_dot.h).
template <typename scalar_t>
bool uses_dot(int64_t block_size, bool allowed) {
#if defined(UTIO_HAS_DOT)
  return allowed && std::is_same_v<scalar_t, at::BFloat16> && block_size % 32 == 0;
#else
  return false;
#endif
}

template <typename scalar_t, typename index_t>
void attend_rows(const scalar_t* query, scalar_t* output, const scalar_t* cache,
                 const Layout& lay, const index_t* table, int64_t table_width,
                 const int64_t* lens, const int64_t* starts, int64_t rows, int64_t heads,
                 int64_t kv_heads, int64_t dim, int64_t block_size, float scale,
                 bool allow_dot) {
  const int64_t per_kv = heads / kv_heads;
  const bool dot = uses_dot<scalar_t>(block_size, allow_dot);
  std::vector<float> q(kMaxVectors * dim), out(kMaxVectors * dim), score(kMaxVectors * block_size);
  std::vector<uint32_t> pairs(kMaxVectors * dim / 2), weights(kMaxVectors * block_size / 2 + 1);
  std::vector<int64_t> channel(dim);  // where out holds channel d
  for (int64_t d = 0; d < dim; ++d) channel[d] = d;
#if defined(UTIO_HAS_DOT)
  if (dot)
    for (int64_t i = 0; i < dim; ++i)  // float i of out: register i / 16, lane i % 16
      channel[32 * (i / 32) + dot_channel((i / 16) % 2, i % 16)] = i;
#endif
  const Queries queries{q.data(), dot ? pairs.data() : nullptr, scale};
  int64_t visible[kMaxVectors];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = starts[r], tokens = starts[r + 1] - starts[r];
    if (tokens <= 0) continue;
    const int64_t vectors = tokens * per_kv;  // vector (i, p): token i, head p of the group
    for (int64_t i = 0; i < tokens; ++i)
      for (int64_t p = 0; p < per_kv; ++p) visible[i * per_kv + p] = lens[r] - (tokens - 1 - i);
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t i = 0; i < tokens; ++i)
        for (int64_t p = 0; p < per_kv; ++p) {
          const scalar_t* src = query + ((first + i) * heads + g * per_kv + p) * dim;
          const int64_t v = i * per_kv + p;
          if (dot) {
            std::memcpy(pairs.data() + v * dim / 2, src, dim * sizeof(scalar_t));
            continue;
          }
          float* dst = q.data() + v * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]) * scale;
        }
      attend_group(queries, visible, vectors, cache, lay, g, table + r * table_width,
                   block_size, dim, score.data(), reinterpret_cast<uint16_t*>(weights.data()),
                   out.data());
      for (int64_t i = 0; i < tokens; ++i)
        for (int64_t p = 0; p < per_kv; ++p) {
          scalar_t* dst = output + ((first + i) * heads + g * per_kv + p) * dim;
          const float* src = out.data() + (i * per_kv + p) * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(src[channel[d]]);
        }
    }
  }
}

#endif  // __AVX512F__

}  // namespace

// Whether this build has the kernel (AVX-512); without it every call raises.
bool decode_attention_available() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// Whether bf16 caches (in blocks of a multiple of 32 tokens) run on dot products here.
bool decode_attention_has_dot() {
#if defined(UTIO_HAS_DOT)
  return true;
#else
  return false;
#endif
}

// output[tokens, heads, dim] = attention of query[tokens, heads, dim] (rows' query tokens
// back to back, row r's at [starts[r], starts[r+1])) over each row's first lens[r]
// positions of the paged cache through its block-table row. bf16_dot: score and weigh bf16
// caches with bf16 pair dot products where the build has them (the weights rounded to bf16
// as flash attention rounds P); false keeps every product in float (a reference for tests
// and benchmarks).
void decode_attention(torch::Tensor query, torch::Tensor output, torch::Tensor cache,
                      std::vector<int64_t> layout, torch::Tensor table, torch::Tensor lens,
                      torch::Tensor starts, int64_t kv_heads, int64_t block_size,
                      double scale, bool bf16_dot) {
#if defined(__AVX512F__)
  TORCH_CHECK(layout.size() == 7, "layout: block_stride, k_start, k_head, k_chan, v_start, "
                                  "v_head, v_tok");
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous() && output.is_contiguous() &&
                  output.sizes() == query.sizes(),
              "query and output: contiguous [tokens, heads, dim] of one shape");
  TORCH_CHECK(query.scalar_type() == cache.scalar_type() &&
                  output.scalar_type() == cache.scalar_type(),
              "query, output and cache: one dtype");
  const int64_t heads = query.size(1), dim = query.size(2), rows = lens.size(0);
  TORCH_CHECK(dim == 64 || dim == 128, "head size 64 or 128");
  TORCH_CHECK(block_size % 16 == 0, "block size: a multiple of 16");
  TORCH_CHECK(heads % kv_heads == 0, "heads: a multiple of kv_heads");
  lens = lens.to(torch::kInt64).contiguous();
  starts = starts.to(torch::kInt64).contiguous();
  table = table.contiguous();
  TORCH_CHECK(starts.size(0) == rows + 1 && table.size(0) >= rows, "starts [rows + 1], table");
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK((st[r + 1] - st[r]) * (heads / kv_heads) <= kMaxVectors,
                "at most 16 query vectors (tokens x heads per KV head) per row");
  const Layout lay{layout[0], layout[1], layout[2], layout[3], layout[4], layout[5], layout[6]};
  AT_DISPATCH_INDEX_TYPES(table.scalar_type(), "decode_attention", [&] {
    const auto* tb = table.data_ptr<index_t>();
    if (cache.scalar_type() == torch::kBFloat16) {
      attend_rows(query.data_ptr<at::BFloat16>(), output.data_ptr<at::BFloat16>(),
                  cache.data_ptr<at::BFloat16>(), lay, tb, table.size(1),
                  lens.data_ptr<int64_t>(), st, rows, heads, kv_heads, dim, block_size,
                  static_cast<float>(scale), bf16_dot);
    } else {
      TORCH_CHECK(cache.scalar_type() == torch::kHalf, "cache: bf16 or fp16");
      attend_rows(query.data_ptr<at::Half>(), output.data_ptr<at::Half>(),
                  cache.data_ptr<at::Half>(), lay, tb, table.size(1),
                  lens.data_ptr<int64_t>(), st, rows, heads, kv_heads, dim, block_size,
                  static_cast<float>(scale), bf16_dot);
    }
  });
#else
  TORCH_CHECK(false, "UTIO's decode attention needs a CPU with AVX-512");
#endif
}
