// AVX-512 VNNI primitives of cpu_kernels.cpp (included there, inside its namespace).

// 16 activations as float32, from float32 or bf16 (bf16 is the top half of a float32).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One block of 32 activations -> two int8 parts, x ~= scale * (q + r / 256): q the rounded value
// and r its rounding error on a 256x finer grid. A product then costs two dot instructions and
// the activations keep more precision than bf16 would. The block's first 16 go to q[lo], r[lo],
// its last 16 to q[hi], r[hi]. Returns the block's sum of q + r / 256.
template <typename T>
inline float quantize_block(const T* x, int8_t* q, int8_t* r, int64_t lo, int64_t hi, float* scale) {
  __m512 a = load16(x), b = load16(x + 16);
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f), fine = _mm512_set1_ps(256.0f);
  __m512 ta = _mm512_mul_ps(a, inv), tb = _mm512_mul_ps(b, inv);
  __m512i qa = _mm512_cvtps_epi32(ta), qb = _mm512_cvtps_epi32(tb);  // round to nearest even
  __m512i ra = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(ta, _mm512_cvtepi32_ps(qa)), fine));
  __m512i rb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(tb, _mm512_cvtepi32_ps(qb)), fine));
  // |r| <= 128: saturating to 127 costs at most 1/256 of a step
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + lo), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + hi), _mm512_cvtsepi32_epi8(qb));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(r + lo), _mm512_cvtsepi32_epi8(ra));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(r + hi), _mm512_cvtsepi32_epi8(rb));
  *scale = amax / 127.0f;
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)) +
         _mm512_reduce_add_epi32(_mm512_add_epi32(ra, rb)) / 256.0f;
}

// The two dot products of one step, joined on the fine grid: dot(w, q) * 256 + dot(w, r).
inline __m512 joined(__m512i dot_q, __m512i dot_r) {
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(dot_q, 8), dot_r));
}

// ---- int8 weights -------------------------------------------------------------------------

// R consecutive weight rows against one activation row: R independent accumulators keep the
// multiply-add pipes busy.
template <int R>
inline void int8_rows(const int8_t* w, int64_t k, const ActivationRow& a, const at::BFloat16* scale,
                      float* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // int8 + 128 as uint8
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 64) {
    __m512i av = _mm512_loadu_si512(a.q.data() + c), rv = _mm512_loadu_si512(a.r.data() + c);
    __m512 sv = _mm512_loadu_ps(a.lane_scales.data() + c / 4);
    for (int r = 0; r < R; ++r) {
      // the rows two calls ahead, which the hardware prefetcher fetched late: a 262,144 x 640 head ran 6-8%
      // faster with it (A/B in one process, this project's 2-core machine); a prefetch past the end is dropped
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * k + c), _MM_HINT_T0);
      __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + r * k + c), flip);
      const __m512i zero = _mm512_setzero_si512();
      acc[r] = _mm512_fmadd_ps(joined(_mm512_dpbusd_epi32(zero, wv, av), _mm512_dpbusd_epi32(zero, wv, rv)),
                               sv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = (_mm512_reduce_add_ps(acc[r]) - a.offset) * static_cast<float>(scale[r]);
}

// ---- 4- and 5-bit codes -------------------------------------------------------------------------

// Unpacks the codes of one row's 128 inputs from `c`: lo holds the 4 groups' inputs 0-15 (16 bytes
// per group), hi their inputs 16-31.
struct CodeUnpacker {
  const __m512i low4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
  __m512i fifth_at;  // multishift: the 8 bits of byte j of qword i start at 8i + j - 4
  CodeUnpacker() {
    alignas(64) uint8_t starts[64];
    for (int b = 0; b < 64; ++b) starts[b] = static_cast<uint8_t>((b - 4) & 63);
    fifth_at = _mm512_load_si512(starts);
  }
  template <bool FIFTH_BIT>
  inline void unpack(const uint8_t* row, int64_t k, int64_t c, __m512i& lo, __m512i& hi) const {
    __m512i packed = _mm512_loadu_si512(row + c / 2);
    lo = _mm512_and_si512(packed, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
    if constexpr (FIFTH_BIT) {  // byte j of qword i takes mask bit 8i + j, placed at bit 4
      const long long* masks = reinterpret_cast<const long long*>(row + k / 2 + c / 8);
      lo = _mm512_ternarylogic_epi32(lo, _mm512_multishift_epi64_epi8(fifth_at, _mm512_set1_epi64(masks[0])), bit4, 0xF8);
      hi = _mm512_ternarylogic_epi32(hi, _mm512_multishift_epi64_epi8(fifth_at, _mm512_set1_epi64(masks[1])), bit4, 0xF8);
    }
  }
  // The same into memory: lo[16 * group + j] the code of input j, hi[16 * group + j] of input j + 16.
  template <bool FIFTH_BIT>
  inline void unpack_bytes(const uint8_t* row, int64_t k, int64_t c, uint8_t lo[64], uint8_t hi[64]) const {
    __m512i l, h;
    unpack<FIFTH_BIT>(row, k, c, l, h);
    _mm512_storeu_si512(lo, l);
    _mm512_storeu_si512(hi, h);
  }
};

template <int R, bool FIFTH_BIT>
inline void code_rows(const uint8_t* rows, int64_t row_bytes, int64_t k, const ActivationRow& a,
                      const CodeUnpacker& codes, float* out) {
  const int64_t groups = k / BLOCK, scales_at = k / 2 + (FIFTH_BIT ? k / 8 : 0);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 128) {
    __m512i q_lo = _mm512_loadu_si512(a.q.data() + c), q_hi = _mm512_loadu_si512(a.q.data() + c + 64);
    __m512i r_lo = _mm512_loadu_si512(a.r.data() + c), r_hi = _mm512_loadu_si512(a.r.data() + c + 64);
    __m512 as = _mm512_loadu_ps(a.lane_scales.data() + c / 8);
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = rows + r * row_bytes;
      __m512i lo, hi;
      codes.unpack<FIFTH_BIT>(row, k, c, lo, hi);
      const __m512i zero = _mm512_setzero_si512();
      __m512 dot = joined(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, q_lo), hi, q_hi),
                          _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, r_lo), hi, r_hi));
      __m128i s4 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + scales_at + c / BLOCK * 2));
      __m512 ws = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(s4)));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws, as), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {  // + sum over groups of min * scale * group sum
    const uint8_t* mins = rows + r * row_bytes + scales_at + groups * 2;
    for (int64_t g = 0; g < groups; g += 16) {
      __mmask16 live = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
      __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, mins + g * 2));
      acc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(live, a.scaled_sums.data() + g), acc[r]);
    }
    out[r] = _mm512_reduce_add_ps(acc[r]);
  }
}

// 16 floats -> 16 bf16, rounded to nearest even; or stored as they are.
inline void store16(at::BFloat16* out, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i round = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, round), 16)));
}
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }

// 16 codes -> code * scale + min, 16 outputs.
template <typename Out>
inline void dequantize16(const uint8_t* codes, float scale, float min, Out* out) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  store16(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), _mm512_set1_ps(scale), _mm512_set1_ps(min)));
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

