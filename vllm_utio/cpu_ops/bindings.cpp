// The Python module of UTIO's CPU ops (one per build; the ops live in their own files).
#include <torch/extension.h>

#include <tuple>
#include <vector>

torch::Tensor sparq_block_mass(torch::Tensor query, torch::Tensor cache, int64_t block_stride,
                               int64_t start, int64_t s_tok, int64_t s_head, int64_t s_chan,
                               torch::Tensor table, torch::Tensor lens, int64_t kv_heads,
                               int64_t block_size, int64_t channels, double scale);
torch::Tensor sparq_restrict(torch::Tensor query, torch::Tensor cache, int64_t block_stride,
                             int64_t start, int64_t s_tok, int64_t s_head, int64_t s_chan,
                             torch::Tensor table, torch::Tensor lens, int64_t kv_heads,
                             int64_t block_size, int64_t channels, double scale,
                             int64_t sink_blocks, int64_t recent_tokens, int64_t budget_blocks,
                             torch::Tensor out_table, torch::Tensor out_rows);
std::tuple<torch::Tensor, torch::Tensor> sparq_restrict_steps(
    torch::Tensor query, torch::Tensor cache, int64_t block_stride, int64_t start,
    int64_t s_tok, int64_t s_head, int64_t s_chan, torch::Tensor table, torch::Tensor lens,
    int64_t kv_heads, int64_t block_size, int64_t channels, double scale, int64_t sink_blocks,
    int64_t recent_tokens, int64_t budget_blocks, torch::Tensor out_table,
    torch::Tensor out_rows, torch::Tensor stamps, int64_t every_steps, int64_t layer,
    torch::Tensor focus, double focus_mass);
bool decode_attention_available();
bool decode_attention_has_dot();
void decode_attention(torch::Tensor query, torch::Tensor output, torch::Tensor cache,
                      std::vector<int64_t> layout, torch::Tensor table, torch::Tensor lens,
                      torch::Tensor starts, int64_t kv_heads, int64_t block_size,
                      double scale, bool bf16_dot);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparq_block_mass", &sparq_block_mass,
        "largest per-head softmax mass of each block from approximate per-key scores");
  m.def("sparq_restrict", &sparq_restrict,
        "sparq_block_mass, then each row's kept blocks written as its restricted table row");
  m.def("sparq_restrict_steps", &sparq_restrict_steps,
        "sparq_restrict where a row chooses afresh every few of its steps, else reuses");
  m.def("decode_attention_available", &decode_attention_available,
        "whether this build has decode_attention (AVX-512)");
  m.def("decode_attention", &decode_attention,
        "paged attention of rows with a few query tokens each, over the 'vec' CPU cache "
        "(bf16_dot: bf16 caches on AVX512-BF16 dot products where the CPU has them)",
        py::arg("query"), py::arg("output"), py::arg("cache"), py::arg("layout"),
        py::arg("table"), py::arg("lens"), py::arg("starts"), py::arg("kv_heads"),
        py::arg("block_size"), py::arg("scale"), py::arg("bf16_dot") = true);
  m.def("decode_attention_has_dot", &decode_attention_has_dot,
        "whether this build runs bf16 caches on AVX512-BF16 dot products");
}
