// AVX-512 helpers shared by UTIO's CPU ops: exp of non-positive floats and 16 bf16/fp16
// values widened to floats.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <torch/extension.h>

#include <type_traits>
#include <utility>

namespace {

#if defined(__AVX512F__)

constexpr int64_t kLanes = 16;  // floats per register

// exp(x) for x <= 0 (scores minus their block maximum): 2^n * exp(f), |f| <= ln2 / 2,
// exp(f) by its degree-6 Taylor polynomial (relative error ~1e-7); below -87 is 0-ish
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// f(std::integral_constant<int, n>{}) for a runtime n in [1, kMax]: the register-tiled
// loops take their vector count as a template parameter (accumulators stay in registers)
template <int kMax, typename F>
inline void with_count(int64_t n, F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((n == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, kMax>{});
}

// 16 keys of one channel as floats
template <typename scalar_t>
inline __m512 load16(const scalar_t* k) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k));
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {  // bf16: the high half of f32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_cvtph_ps(raw);
  }
}

#endif  // __AVX512F__

}  // namespace
