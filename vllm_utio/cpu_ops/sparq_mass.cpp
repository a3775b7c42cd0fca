// Query-aware block ranking from approximate per-key scores (SparQ, Ribar et al. 2024),
// read straight from vLLM's paged CPU KV cache.
//
// For each row (a decode token) and KV head: the `channels` channels with the largest
// |q| summed over the KV head's query heads are chosen; every cached key of the row is
// scored on those channels only (scaled by SparQ's temperature), each query head's scores
// are softmaxed over the row's positions, and a block's mass is the sum over its
// positions. The output is a block's largest mass over all query heads: what one block
// table shared by every head should keep. The torch spec is
// vllm_utio.kv_selection.sparq_block_mass; this op reads the keys where they are (a
// channel of a block is a contiguous run in the CPU backend's layout), so it touches
// `channels / head_size` of the K bytes and nothing else.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

// blocks prefetched ahead: at 4k context, 32-token blocks and one thread, 6 took 15% less
// time than 2 with the cache on 4 KiB pages, 27% less on 2 MiB ones. Prefetches go into
// L2 (locality 1, prefetcht2), as in the decode attention op: on a Zen 4 the same op took
// 0.56-0.67x the time of prefetching into L1 (2026-12-07)
constexpr int64_t kAhead = 6;
constexpr int64_t kLine = 64;  // cache line bytes

// keys as float; bf16 by its bits (a shift), so the loops below vectorize
inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The `channels` channels of a KV head's query group with the largest |q| (ascending, so
// reads within a block go forward: the hardware prefetcher follows them), each head's
// query on them (`qr`, [per_kv, channels]) and its softmax factor: the attention scale
// over SparQ's temperature, sqrt of the share of |q| the chosen channels carry.
inline void choose_channels(const float* q, int64_t per_kv, int64_t head_size,
                            int64_t channels, double scale, std::vector<int64_t>& order,
                            std::vector<float>& weight, std::vector<float>& qr,
                            std::vector<float>& inv_temp) {
  for (int64_t c = 0; c < head_size; ++c) {
    float w = 0.0f;
    for (int64_t h = 0; h < per_kv; ++h) w += std::fabs(q[h * head_size + c]);
    weight[c] = w;
  }
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + channels, order.end(),
                    [&](int64_t a, int64_t b) { return weight[a] > weight[b]; });
  std::sort(order.begin(), order.begin() + channels);
  for (int64_t h = 0; h < per_kv; ++h) {
    float part = 0.0f, whole = 0.0f;
    for (int64_t c = 0; c < head_size; ++c) whole += std::fabs(q[h * head_size + c]);
    for (int64_t j = 0; j < channels; ++j) {
      qr[h * channels + j] = q[h * head_size + order[j]];
      part += std::fabs(qr[h * channels + j]);
    }
    const float ratio = whole > 0.0f ? std::max(part / whole, 1e-6f) : 1.0f;
    inv_temp[h] = static_cast<float>(scale) / std::sqrt(ratio);
  }
}

// The general path: any key dtype and layout, scores of a row kept whole, then softmaxed.
template <typename scalar_t>
void rank_rows(const float* query, const scalar_t* cache, int64_t block_stride, int64_t start,
               int64_t s_tok, int64_t s_head, int64_t s_chan, const int64_t* table,
               int64_t table_width, const int64_t* lens, int64_t num_heads, int64_t kv_heads,
               int64_t head_size, int64_t block_size, int64_t channels, double scale,
               int64_t width, float* out, int64_t row_begin, int64_t row_end) {
  const int64_t per_kv = num_heads / kv_heads;
  std::vector<int64_t> order(head_size);
  std::vector<float> weight(head_size), qr(per_kv * channels), inv_temp(per_kv);
  std::vector<float> acc, key(block_size);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t len = lens[r];
    const int64_t nb = (len + block_size - 1) / block_size;
    float* row_out = out + r * width;
    std::fill(row_out, row_out + width, 0.0f);
    if (len <= 0) continue;
    acc.assign(per_kv * nb * block_size, 0.0f);
    for (int64_t g = 0; g < kv_heads; ++g) {
      const float* q = query + (r * num_heads + g * per_kv) * head_size;  // [per_kv, D]
      choose_channels(q, per_kv, head_size, channels, scale, order, weight, qr, inv_temp);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t n = 0; n < nb; ++n) {
        const int64_t block = table[r * table_width + n];
        const int64_t count = std::min(block_size, len - n * block_size);
        const scalar_t* base = cache + block * block_stride + start + g * s_head;
        if (n + kAhead < nb) {
          // blocks sit at random places in the cache: ask for a later block's channels
          // now, or every channel read waits a full memory latency
          const scalar_t* later =
              cache + table[r * table_width + n + kAhead] * block_stride + start + g * s_head;
          if (s_tok == 1) {  // a channel: one contiguous run of block_size keys
            for (int64_t j = 0; j < channels; ++j)
              for (int64_t s = 0; s < block_size; s += kLine / sizeof(scalar_t))
                __builtin_prefetch(later + order[j] * s_chan + s, 0, 1);
          } else {  // a token's channels sit together: one line per token
            for (int64_t s = 0; s < block_size; ++s)
              __builtin_prefetch(later + s * s_tok + order[0] * s_chan, 0, 1);
          }
        }
        for (int64_t j = 0; j < channels; ++j) {
          // one channel of the block's keys: a contiguous run when tokens are innermost
          const scalar_t* k = base + order[j] * s_chan;
          float* kf = key.data();
          if (s_tok == 1) {
            for (int64_t s = 0; s < count; ++s) kf[s] = to_float(k[s]);
          } else {
            for (int64_t s = 0; s < count; ++s) kf[s] = to_float(k[s * s_tok]);
          }
          for (int64_t h = 0; h < per_kv; ++h) {
            const float qv = qr[h * channels + j];
            float* a = acc.data() + (h * nb + n) * block_size;
            for (int64_t s = 0; s < count; ++s) a[s] += qv * kf[s];
          }
        }
      }
      for (int64_t h = 0; h < per_kv; ++h) {
        float* a = acc.data() + h * nb * block_size;
        const float it = inv_temp[h];
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) top = std::max(top, a[t] * it);
        float total = 0.0f;
        for (int64_t t = 0; t < len; ++t) {  // vectorized expf (libmvec) under -ffast-math
          a[t] = std::exp(a[t] * it - top);
          total += a[t];
        }
        for (int64_t n = 0; n < nb; ++n) {
          const int64_t count = std::min(block_size, len - n * block_size);
          float mass = 0.0f;
          for (int64_t s = 0; s < count; ++s) mass += a[n * block_size + s];
          row_out[n] = std::max(row_out[n], mass / total);
        }
      }
    }
  }
}

}  // namespace

// the fast path (AVX-512), after the helpers it shares
#include "sparq_avx512.h"

torch::Tensor sparq_block_mass(torch::Tensor query, torch::Tensor cache, int64_t block_stride,
                               int64_t start, int64_t s_tok, int64_t s_head, int64_t s_chan,
                               torch::Tensor table, torch::Tensor lens, int64_t kv_heads,
                               int64_t block_size, int64_t channels, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == torch::kFloat32, "query [R, H, D] f32");
  // blocks may be strided (block_stride); the offsets address inside one block
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kInt64, "table [R, W] int64");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == torch::kInt64, "lens [R] int64");
  query = query.contiguous();
  table = table.contiguous();
  lens = lens.contiguous();
  const int64_t rows = query.size(0), num_heads = query.size(1), head_size = query.size(2);
  TORCH_CHECK(num_heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(channels > 0 && channels <= head_size, "channels must be in 1..head_size");
  const int64_t longest = rows ? lens.max().item<int64_t>() : 0;
  const int64_t width = (longest + block_size - 1) / block_size;
  TORCH_CHECK(width <= table.size(1), "a row has more blocks than its table");
  auto out = torch::zeros({rows, width}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, cache.scalar_type(), "sparq_block_mass",
      [&] {
        const auto* q = query.data_ptr<float>();
        const auto* c = cache.data_ptr<scalar_t>();
        const auto* tb = table.data_ptr<int64_t>();
        const auto* ln = lens.data_ptr<int64_t>();
        auto* o = out.data_ptr<float>();
        at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
          if (rank_rows_fast<scalar_t>(q, c, block_stride, start, s_tok, s_head, s_chan, tb,
                                       table.size(1), ln, num_heads, kv_heads, head_size,
                                       block_size, channels, scale, width, o, begin, end))
            return;
          rank_rows<scalar_t>(q, c, block_stride, start, s_tok, s_head, s_chan, tb,
                              table.size(1), ln, num_heads, kv_heads, head_size, block_size,
                              channels, scale, width, o, begin, end);
        });
      });
  return out;
}

namespace {

// The blocks of a row of `len` positions: count, the tokens of its last one, and where
// its recent window (the blocks holding the last `recent_tokens` positions) starts.
struct RowBlocks {
  int64_t nb, last_len, recent_from;
  RowBlocks(int64_t len, int64_t block_size, int64_t recent_tokens) {
    nb = (len + block_size - 1) / block_size;
    last_len = len - block_size * (nb - 1);
    recent_from =
        nb - 1 - std::max<int64_t>(0, (recent_tokens - last_len + block_size - 1) / block_size);
  }
};

// One row's choice (spec: kv_selection.select_blocks without top_p or held blocks): the
// sinks, the blocks of the recent window, then the blocks of largest mass until
// `budget_blocks` are kept. Fills `kept` [nb].
inline void choose_row(const float* mass, const RowBlocks& b, int64_t sink_blocks,
                       int64_t budget_blocks, std::vector<uint8_t>& kept,
                       std::vector<int64_t>& cand) {
  kept.assign(b.nb, 0);
  int64_t count = 0;
  cand.clear();
  for (int64_t n = 0; n < b.nb; ++n) {
    if (n < sink_blocks || n >= b.recent_from) {
      kept[n] = 1;
      ++count;
    } else {
      cand.push_back(n);
    }
  }
  const int64_t extra = std::min<int64_t>(std::max<int64_t>(budget_blocks - count, 0),
                                          static_cast<int64_t>(cand.size()));
  // the `extra` candidates of largest mass (ties: the earlier block, as a stable rank)
  auto better = [&](int64_t a, int64_t b) {
    return mass[a] > mass[b] || (mass[a] == mass[b] && a < b);
  };
  std::nth_element(cand.begin(), cand.begin() + extra, cand.end(), better);
  for (int64_t i = 0; i < extra; ++i) kept[cand[i]] = 1;
}

// A row's restricted table row (spec: kv_selection.restrict_rows): the kept blocks in
// logical order, the others after them. Returns the restricted length.
template <typename id_t>
int64_t write_row(const std::vector<uint8_t>& kept, const RowBlocks& b, const int64_t* src,
                  id_t* dst, int64_t block_size) {
  int64_t count = 0;
  for (int64_t n = 0; n < b.nb; ++n) count += kept[n];
  int64_t front = 0, back = count;
  for (int64_t n = 0; n < b.nb; ++n) dst[kept[n] ? front++ : back++] = static_cast<id_t>(src[n]);
  return block_size * (count - 1) + b.last_len;
}

void check_out(const torch::Tensor& query, const torch::Tensor& out_table,
               const torch::Tensor& out_rows, int64_t budget_blocks) {
  TORCH_CHECK(out_table.dim() == 2 && out_table.is_contiguous() && out_table.device().is_cpu(),
              "out_table: a contiguous CPU [B, W] tensor");
  TORCH_CHECK(out_rows.dim() == 1 && out_rows.scalar_type() == torch::kInt64 &&
                  out_rows.size(0) == query.size(0),
              "out_rows [R] int64");
  TORCH_CHECK(budget_blocks >= 1, "budget_blocks must be >= 1");
}

// Where a row's blocks come from: the choice on its masses (`mass` row `mass_row[r]`, its
// kept blocks stamped with its length when `stamps` is given), or, for mass_row -1, its
// last choice (the blocks stamped `last[r]`) plus today's sinks and recent window.
struct RowSources {
  const float* mass;
  int64_t mass_width;
  std::vector<int64_t> mass_row;
  int32_t* stamps;  // nullptr: no stamps kept
  int64_t stamps_row;
  std::vector<int32_t> last;
};

// Every row's restricted table row written into `out_table` at `out_rows[r]`; returns the
// restricted lengths.
torch::Tensor restrict_rows_into(const RowSources& src, torch::Tensor table,
                                 torch::Tensor lens, torch::Tensor out_table,
                                 torch::Tensor out_rows, int64_t block_size,
                                 int64_t sink_blocks, int64_t recent_tokens,
                                 int64_t budget_blocks) {
  table = table.contiguous();
  lens = lens.contiguous();
  out_rows = out_rows.contiguous();
  const int64_t rows = lens.size(0);
  const auto* tb = table.data_ptr<int64_t>();
  const auto* ln = lens.data_ptr<int64_t>();
  const auto* dst_rows = out_rows.data_ptr<int64_t>();
  auto new_lens = torch::empty({rows}, lens.options());
  auto* nl = new_lens.data_ptr<int64_t>();
  std::vector<uint8_t> kept;
  std::vector<int64_t> cand;
  AT_DISPATCH_INDEX_TYPES(out_table.scalar_type(), "sparq_restrict", [&] {
    auto* dst = out_table.data_ptr<index_t>();
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(dst_rows[r] >= 0 && dst_rows[r] < out_table.size(0), "out_rows out of range");
      const int64_t len = ln[r];
      if (len <= 0) {
        nl[r] = len;
        continue;
      }
      const RowBlocks b(len, block_size, recent_tokens);
      TORCH_CHECK(b.nb <= out_table.size(1), "out_table is narrower than the rows' blocks");
      int32_t* row_stamps = src.stamps ? src.stamps + r * src.stamps_row : nullptr;
      if (src.mass_row[r] >= 0) {
        choose_row(src.mass + src.mass_row[r] * src.mass_width, b, sink_blocks, budget_blocks,
                   kept, cand);
        if (row_stamps)
          for (int64_t n = 0; n < b.nb; ++n)
            if (kept[n]) row_stamps[n] = static_cast<int32_t>(len);
      } else {
        kept.assign(b.nb, 0);
        for (int64_t n = 0; n < b.nb; ++n)
          kept[n] = n < sink_blocks || n >= b.recent_from || row_stamps[n] == src.last[r];
      }
      nl[r] = write_row(kept, b, tb + r * table.size(1), dst + dst_rows[r] * out_table.size(1),
                        block_size);
    }
  });
  return new_lens;
}

}  // namespace

// select's whole choice for 'sparq' rows in one call: each row's block masses
// (sparq_block_mass), its kept blocks, and its restricted block-table row written in
// place into `out_table` at row `out_rows[r]`. Returns the rows' restricted lengths.
torch::Tensor sparq_restrict(torch::Tensor query, torch::Tensor cache, int64_t block_stride,
                             int64_t start, int64_t s_tok, int64_t s_head, int64_t s_chan,
                             torch::Tensor table, torch::Tensor lens, int64_t kv_heads,
                             int64_t block_size, int64_t channels, double scale,
                             int64_t sink_blocks, int64_t recent_tokens, int64_t budget_blocks,
                             torch::Tensor out_table, torch::Tensor out_rows) {
  check_out(query, out_table, out_rows, budget_blocks);
  const auto mass = sparq_block_mass(query, cache, block_stride, start, s_tok, s_head, s_chan,
                                     table, lens, kv_heads, block_size, channels, scale);
  RowSources src{mass.data_ptr<float>(), mass.size(1), std::vector<int64_t>(query.size(0)),
                 nullptr, 0, {}};
  std::iota(src.mass_row.begin(), src.mass_row.end(), 0);
  return restrict_rows_into(src, table, lens, out_table, out_rows, block_size, sink_blocks,
                            recent_tokens, budget_blocks);
}

// sparq_restrict where a row chooses afresh only every `every_steps` of its decode steps
// at this layer (spec: kv_selection.chooses_now, reused_blocks and finds_focus). `stamps`
// [R, >= W] int32 (rows may be strided) holds, per logical block, the row's length when a
// choice last kept it; a choosing row stamps its kept blocks, a reusing row keeps the
// blocks of its last choice plus today's sinks and recent window. Only choosing rows are
// scored. With `focus_mass` > 0, `focus` [R] int32 (any stride, shared by the row's
// layers) holds the row's length when a choice last found a block outside its sinks and
// recent window with at least that mass; a row chooses at every layer on that step (from
// the finding layer on) and the next. Returns the restricted lengths and, per row, 0
// (reused), 1 (chose: its turn, or no recent choice) or 2 (chose: focused).
std::tuple<torch::Tensor, torch::Tensor> sparq_restrict_steps(
    torch::Tensor query, torch::Tensor cache, int64_t block_stride, int64_t start,
    int64_t s_tok, int64_t s_head, int64_t s_chan, torch::Tensor table, torch::Tensor lens,
    int64_t kv_heads, int64_t block_size, int64_t channels, double scale, int64_t sink_blocks,
    int64_t recent_tokens, int64_t budget_blocks, torch::Tensor out_table,
    torch::Tensor out_rows, torch::Tensor stamps, int64_t every_steps, int64_t layer,
    torch::Tensor focus, double focus_mass) {
  check_out(query, out_table, out_rows, budget_blocks);
  TORCH_CHECK(every_steps >= 1, "every_steps must be >= 1");
  TORCH_CHECK(stamps.dim() == 2 && stamps.scalar_type() == torch::kInt32 &&
                  stamps.stride(1) == 1 && stamps.size(0) == query.size(0),
              "stamps [R, W] int32 with contiguous rows");
  TORCH_CHECK(focus.dim() == 1 && focus.scalar_type() == torch::kInt32 &&
                  focus.size(0) == query.size(0),
              "focus [R] int32");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kInt64, "table [R, W] int64");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == torch::kInt64, "lens [R] int64");
  lens = lens.contiguous();
  const int64_t rows = query.size(0);
  const auto* ln = lens.data_ptr<int64_t>();
  auto* st = stamps.data_ptr<int32_t>();
  const int64_t st_row = stamps.stride(0);
  int32_t* fo = focus.data_ptr<int32_t>();
  const int64_t fo_step = focus.stride(0);
  const bool focusing = focus_mass > 0.0;
  auto chose = torch::zeros({rows}, torch::kInt8);
  auto* ch = chose.data_ptr<int8_t>();
  RowSources src{nullptr, 0, std::vector<int64_t>(rows, -1), st, st_row,
                 std::vector<int32_t>(rows)};
  std::vector<int64_t> picked;  // rows that choose now
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t nb = (ln[r] + block_size - 1) / block_size;
    TORCH_CHECK(nb <= stamps.size(1), "stamps are narrower than a row's blocks");
    int32_t top = std::numeric_limits<int32_t>::min();
    const int64_t len = ln[r];
    for (int64_t n = 0; n < nb; ++n) {
      const int32_t stamp = st[r * st_row + n];
      if (stamp <= len) top = std::max(top, stamp);  // later ones: rejected speculation
    }
    src.last[r] = top;
    const int32_t found = fo[r * fo_step];  // later than len: rejected speculation
    if (len <= 0)
      ch[r] = 0;
    else if (len - top >= every_steps || (len + layer) % every_steps == 0)
      ch[r] = 1;
    else
      ch[r] = focusing && found <= len && found >= len - 1 ? 2 : 0;
    if (ch[r]) {
      src.mass_row[r] = static_cast<int64_t>(picked.size());
      picked.push_back(r);
    }
  }
  torch::Tensor mass;
  if (!picked.empty()) {
    const auto idx = torch::tensor(picked, torch::kInt64);
    mass = sparq_block_mass(query.index_select(0, idx), cache, block_stride, start, s_tok,
                            s_head, s_chan, table.index_select(0, idx), lens.index_select(0, idx),
                            kv_heads, block_size, channels, scale);
    src.mass = mass.data_ptr<float>();
    src.mass_width = mass.size(1);
    if (focusing)  // a block outside the always-kept ones holding a head's attention
      for (size_t i = 0; i < picked.size(); ++i) {
        const int64_t r = picked[i];
        const RowBlocks b(ln[r], block_size, recent_tokens);
        const float* m = src.mass + static_cast<int64_t>(i) * src.mass_width;
        for (int64_t n = sink_blocks; n < b.recent_from; ++n)
          if (m[n] >= focus_mass) {
            fo[r * fo_step] = static_cast<int32_t>(ln[r]);
            break;
          }
      }
  }
  auto new_lens = restrict_rows_into(src, table, lens, out_table, out_rows, block_size,
                                     sink_blocks, recent_tokens, budget_blocks);
  return {new_lens, chose};
}
