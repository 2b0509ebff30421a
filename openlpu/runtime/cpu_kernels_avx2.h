// AVX2 primitives of cpu_kernels.cpp (included there, inside its namespace): the products of the
// AVX-512 VNNI ones, on the same weight and activation layouts, 32 bytes at a time.
//
// AVX2 has no byte dot product into 32 bits: vpmaddubsw multiplies unsigned by signed bytes into
// saturating 16-bit sums of pairs, and vpmaddwd adds those pairs into 32 bits. Codes (< 32) times
// int8 activations stay far below saturation. Int8 weights go in as their magnitudes, with their
// signs moved onto the activations, so a pair is at most 2 * 128 * 127 < 2 ** 15; the AVX-512
// kernel's +128 offset (ActivationRow::offset) is not used here.

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// 8 activations as float32, from float32 or bf16 (bf16 is the top half of a float32).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 16 int32 (a's 8, then b's) -> 16 int8 in that order, saturated.
inline __m128i saturate_to_int8(__m256i a, __m256i b) {
  // packs works within 128-bit lanes: a0-3 b0-3 | a4-7 b4-7; the permute restores a0-7 b0-7
  __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  return _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}

// One block of 32 activations -> q and r, as the AVX-512 kernel's quantize_block, but for r, which is
// clamped to -127..127 (vpsignb cannot negate -128), not saturated to -128..127: a 1/256 step, once in a while.
template <typename T>
inline float quantize_block(const T* x, int8_t* q, int8_t* r, int64_t lo, int64_t hi, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f), fine = _mm256_set1_ps(256.0f);
  __m256 v[4], magnitude = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) magnitude = _mm256_max_ps(magnitude, _mm256_andnot_ps(sign, v[i] = load8(x + 8 * i)));
  const float amax = hmax(magnitude);
  const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
  __m256i qi[4], ri[4], q_sum = _mm256_setzero_si256(), r_sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 t = _mm256_mul_ps(v[i], inv);
    qi[i] = _mm256_cvtps_epi32(t);  // round to nearest even
    ri[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(t, _mm256_cvtepi32_ps(qi[i])), fine));
    ri[i] = _mm256_max_epi32(_mm256_min_epi32(ri[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    q_sum = _mm256_add_epi32(q_sum, qi[i]);
    r_sum = _mm256_add_epi32(r_sum, ri[i]);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + lo), saturate_to_int8(qi[0], qi[1]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + hi), saturate_to_int8(qi[2], qi[3]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(r + lo), saturate_to_int8(ri[0], ri[1]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(r + hi), saturate_to_int8(ri[2], ri[3]));
  *scale = amax / 127.0f;
  return hsum(q_sum) + hsum(r_sum) / 256.0f;
}

// 32 unsigned bytes times 32 signed bytes -> 8 int32 sums of 4 neighbouring products.
inline __m256i dot4(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }

// The two dot products of one step, joined on the fine grid: dot(w, q) * 256 + dot(w, r).
inline __m256 joined(__m256i dot_q, __m256i dot_r) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(dot_q, 8), dot_r));
}

// ---- int8 weights -------------------------------------------------------------------------

template <int R>
inline void int8_rows(const int8_t* w, int64_t k, const ActivationRow& a, const at::BFloat16* scale,
                      float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + c));
    const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.r.data() + c));
    const __m256 sv = _mm256_loadu_ps(a.lane_scales.data() + c / 4);  // 8 lanes, all of this block
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * k + c), _MM_HINT_T0);  // as the AVX-512 kernel
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + c));
      const __m256i magnitude = _mm256_abs_epi8(wv);
      acc[r] = _mm256_fmadd_ps(joined(dot4(magnitude, _mm256_sign_epi8(av, wv)),
                                      dot4(magnitude, _mm256_sign_epi8(rv, wv))), sv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) * static_cast<float>(scale[r]);
}

// ---- 4- and 5-bit codes -------------------------------------------------------------------------

// Unpacks the codes of one row's 128 inputs from `c`, 32 bytes per register: lo[0] holds groups 0
// and 1's inputs 0-15, lo[1] groups 2 and 3's; hi the same groups' inputs 16-31.
struct CodeUnpacker {
  const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
  // byte j of 32 takes bit j of a 32-bit mask: byte j / 8 of the mask, tested against 1 << j % 8
  const __m256i mask_byte = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit_of_byte = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));

  inline __m256i fifth_bits(uint32_t mask) const {  // 0x10 in byte j where bit j of mask is set
    const __m256i bits = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(mask)), mask_byte),
                                          bit_of_byte);
    return _mm256_and_si256(_mm256_cmpeq_epi8(bits, bit_of_byte), bit4);
  }
  template <bool FIFTH_BIT>
  inline void unpack(const uint8_t* row, int64_t k, int64_t c, __m256i lo[2], __m256i hi[2]) const {
    for (int half = 0; half < 2; ++half) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2 + 32 * half));
      lo[half] = _mm256_and_si256(packed, low4);
      hi[half] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
    }
    if constexpr (FIFTH_BIT) {  // per 128 inputs: 64 mask bits for the inputs 0-15, then 64 for 16-31
      const uint32_t* masks = reinterpret_cast<const uint32_t*>(row + k / 2 + c / 8);
      for (int half = 0; half < 2; ++half) {
        lo[half] = _mm256_or_si256(lo[half], fifth_bits(masks[half]));
        hi[half] = _mm256_or_si256(hi[half], fifth_bits(masks[2 + half]));
      }
    }
  }
  // The same into memory: lo[16 * group + j] the code of input j, hi[16 * group + j] of input j + 16.
  template <bool FIFTH_BIT>
  inline void unpack_bytes(const uint8_t* row, int64_t k, int64_t c, uint8_t lo[64], uint8_t hi[64]) const {
    __m256i l[2], h[2];
    unpack<FIFTH_BIT>(row, k, c, l, h);
    for (int half = 0; half < 2; ++half) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + 32 * half), l[half]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + 32 * half), h[half]);
    }
  }
};

template <int R, bool FIFTH_BIT>
inline void code_rows(const uint8_t* rows, int64_t row_bytes, int64_t k, const ActivationRow& a,
                      const CodeUnpacker& codes, float* out) {
  const int64_t groups = k / BLOCK, scales_at = k / 2 + (FIFTH_BIT ? k / 8 : 0);
  const __m256i spread[2] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)};
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 128) {
    __m256i q_lo[2], q_hi[2], r_lo[2], r_hi[2];
    for (int half = 0; half < 2; ++half) {
      q_lo[half] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + c + 32 * half));
      q_hi[half] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + c + 64 + 32 * half));
      r_lo[half] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.r.data() + c + 32 * half));
      r_hi[half] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.r.data() + c + 64 + 32 * half));
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = rows + r * row_bytes;
      // the same 128 inputs' codes of the row 2R rows on (two groups ahead: a decode step's call after next),
      // and as far into its tail (a 5-bit row's fifth bits, scales and mins; a 4-bit row's shorter tail, then
      // the next row's codes): the embedded model's 4- and 5-bit matrices streamed at 11.1 GB/s with, 7.9
      // without, its head at 16.1 and 13.9 (median of 40 alternating runs in one process, this project's
      // 2-thread AMD EPYC)
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * R * row_bytes + c / 2), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * R * row_bytes + k / 2 + c / 4), _MM_HINT_T0);
      __m256i lo[2], hi[2];
      codes.unpack<FIFTH_BIT>(row, k, c, lo, hi);
      const __m128 scales = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + scales_at + c / BLOCK * 2)));
      for (int half = 0; half < 2; ++half) {  // groups 2 * half and 2 * half + 1, 4 lanes each
        // a pair of codes times activations is at most 2 * 31 * 127: the lo and hi pairs add in 16 bits
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i dot_q = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[half], q_lo[half]),
                                                                 _mm256_maddubs_epi16(hi[half], q_hi[half])), ones);
        const __m256i dot_r = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[half], r_lo[half]),
                                                                 _mm256_maddubs_epi16(hi[half], r_hi[half])), ones);
        const __m256 ws = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(scales), spread[half]);
        const __m256 as = _mm256_loadu_ps(a.lane_scales.data() + c / 8 + 8 * half);
        acc[r] = _mm256_fmadd_ps(joined(dot_q, dot_r), _mm256_mul_ps(ws, as), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {  // + sum over groups of min * scale * group sum
    const uint8_t* mins = rows + r * row_bytes + scales_at + groups * 2;
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g * 2)));
      acc[r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(a.scaled_sums.data() + g), acc[r]);
    }
    float tail = 0;
    for (; g < groups; ++g)
      tail += static_cast<float>(reinterpret_cast<const at::Half*>(mins)[g]) * a.scaled_sums[g];
    out[r] = hsum(acc[r]) + tail;
  }
}

// 8 floats -> 8 bf16, rounded to nearest even; or stored as they are.
inline void store8(at::BFloat16* out, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i round = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, round), 16);
  const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), halves);
}
inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }

// 16 codes -> code * scale + min, 16 outputs.
template <typename Out>
inline void dequantize16(const uint8_t* codes, float scale, float min, Out* out) {
  for (int eighth = 0; eighth < 2; ++eighth) {
    const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * eighth)));
    store8(out + 8 * eighth, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), _mm256_set1_ps(scale), _mm256_set1_ps(min)));
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}
