// Low-bit matrix products for a decode step on x86 CPUs with AVX-512 VNNI.
//
// A decode step multiplies one (or a few) activation rows by every weight matrix, so its speed is
// the rate at which weight bytes are turned into dot products. Torch's weight-only kernels convert
// each weight to floating point first and run out of instructions before memory runs out of
// bandwidth. Here the activations are quantized to int8 in blocks of 32 inputs (one float scale per
// block, as llama.cpp's Q8_0, plus an int8 residual for precision), and vpdpbusd multiplies 64
// weight bytes by 64 activation bytes in one instruction, leaving the products bound by memory.
//
// Weight formats (built by kernels.py):
//   int8: [N, K] int8, symmetric, one scale per row (bf16 [N]): w = q * scale.
//   codes: 4- or 5-bit codes, asymmetric per group of 32 inputs: w = code * scale + min
//         (GGUF's Q4_0/1, Q5_0/1 and Q4_K/Q5_K are all this). One uint8 row per output, so that
//         a row is one stream for the prefetcher:
//           K/2 bytes of low 4 bits: byte j of a group's 16 holds inputs j (low nibble) and j + 16;
//           5-bit only, K/8 bytes of fifth bits: per 128 inputs (4 groups) a 64-bit mask for the
//             groups' inputs 0-15, then one for inputs 16-31, bit 16 * group + j for input j (+ 16);
//           K/32 fp16 scales, then K/32 fp16 mins.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // inputs per activation scale, and per group of codes
constexpr int64_t MIN_TASK = 16384;  // weights per parallel task, so small products stay on one thread

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

// One activation row, quantized for one kernel's weight layout.
//   int8 rows: inputs in order; 16 lane scales / 256 per 64 inputs (lanes 0-7 the first block's).
//   codes: per 128 inputs (4 groups), 64 bytes of each group's first 16 inputs, then 64 bytes of
//   each group's last 16; 16 lane scales / 256 per 128 inputs (4 lanes per group).
// Per block, the scale times the block's sum: the codes' mins and the int8 weights' +128 offset
// (`offset`, their sum times 128) are undone with it.
struct ActivationRow {
  std::vector<int8_t> q, r;
  std::vector<float> lane_scales, scaled_sums;
  float offset = 0;
};

template <typename T>
ActivationRow quantize_row(const T* x, int64_t k, bool code_layout) {
  const int lanes = code_layout ? 4 : 8;  // 16 lanes per 128 or per 64 inputs
  ActivationRow row;
  row.q.resize(k);
  row.r.resize(k);
  row.lane_scales.resize(k / BLOCK * lanes);
  row.scaled_sums.resize(k / BLOCK);
  for (int64_t b = 0; b < k / BLOCK; ++b) {
    const int64_t first = code_layout ? (b / 4) * 128 + (b % 4) * 16 : b * BLOCK;
    float s;
    const float sum = quantize_block(x + b * BLOCK, row.q.data(), row.r.data(), first,
                                     first + (code_layout ? 64 : 16), &s);
    for (int l = 0; l < lanes; ++l) row.lane_scales[b * lanes + l] = s / 256.0f;
    row.scaled_sums[b] = s * sum;
    row.offset += 128.0f * row.scaled_sums[b];
  }
  return row;
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

// y [m, n] = x [m, k] @ int8 rows w [n, k].T * scale.
template <typename T>
void int8_product(const T* x, int64_t m, int64_t k, const int8_t* w, const at::BFloat16* scale, int64_t n,
                  float* y) {
  std::vector<ActivationRow> rows;
  for (int64_t i = 0; i < m; ++i) rows.push_back(quantize_row(x + i * k, k, false));
  at::parallel_for(0, (n + 3) / 4, std::max<int64_t>(1, MIN_TASK / (4 * k)), [&](int64_t q0, int64_t q1) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t r = q0 * 4; r < std::min(q1 * 4, n); r += 4) {
        if (r + 4 <= n) int8_rows<4>(w + r * k, k, rows[i], scale + r, y + i * n + r);
        else for (int64_t t = r; t < n; ++t) int8_rows<1>(w + t * k, k, rows[i], scale + t, y + i * n + t);
      }
    }
  });
}

// ---- 4- and 5-bit codes -------------------------------------------------------------------------

// Bytes of one row of codes.
inline int64_t code_row_bytes(int64_t k, bool fifth_bit) { return k / 2 + (fifth_bit ? k / 8 : 0) + k / 8; }

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

// 16 floats -> 16 bf16, rounded to nearest even.
inline void store_bf16(at::BFloat16* out, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i round = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, round), 16)));
}

template <bool FIFTH_BIT>
void dequantize_rows(const uint8_t* rows, int64_t row_bytes, int64_t k, int64_t r0, int64_t r1, at::BFloat16* out) {
  const CodeUnpacker codes;
  const int64_t groups = k / BLOCK, scales_at = k / 2 + (FIFTH_BIT ? k / 8 : 0);
  alignas(64) uint8_t lo_bytes[64], hi_bytes[64];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = rows + r * row_bytes;
    const at::Half* scales = reinterpret_cast<const at::Half*>(row + scales_at);
    for (int64_t c = 0; c < k; c += 128) {
      __m512i lo, hi;
      codes.unpack<FIFTH_BIT>(row, k, c, lo, hi);
      _mm512_store_si512(lo_bytes, lo);
      _mm512_store_si512(hi_bytes, hi);
      for (int g = 0; g < 4; ++g) {
        const int64_t group = c / BLOCK + g;
        __m512 scale = _mm512_set1_ps(static_cast<float>(scales[group]));
        __m512 low = _mm512_set1_ps(static_cast<float>(scales[groups + group]));
        for (int half = 0; half < 2; ++half) {
          __m128i bytes = _mm_load_si128(reinterpret_cast<const __m128i*>((half ? hi_bytes : lo_bytes) + 16 * g));
          __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), scale, low);
          store_bf16(out + r * k + group * BLOCK + 16 * half, v);
        }
      }
    }
  }
}

// y [m, n] = x [m, k] @ rows of codes [n, row_bytes].T.
template <typename T, bool FIFTH_BIT>
void code_product(const T* x, int64_t m, int64_t k, const uint8_t* w, int64_t row_bytes, int64_t n, float* y) {
  std::vector<ActivationRow> rows;
  for (int64_t i = 0; i < m; ++i) rows.push_back(quantize_row(x + i * k, k, true));
  const CodeUnpacker unpacker;
  at::parallel_for(0, (n + 3) / 4, std::max<int64_t>(1, MIN_TASK / (4 * k)), [&](int64_t q0, int64_t q1) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t r = q0 * 4; r < std::min(q1 * 4, n); r += 4) {
        if (r + 4 <= n) code_rows<4, FIFTH_BIT>(w + r * row_bytes, row_bytes, k, rows[i], unpacker, y + i * n + r);
        else for (int64_t t = r; t < n; ++t)
          code_rows<1, FIFTH_BIT>(w + t * row_bytes, row_bytes, k, rows[i], unpacker, y + i * n + t);
      }
    }
  });
}

// One weight matrix as the layer kernel runs it: int8 rows (bits 8, with scale) or codes (4, 5).
struct Matrix {
  torch::Tensor weight, scale;
  int64_t bits;

  void apply(const float* x, float* y) const {
    const int64_t n = weight.size(0);
    if (bits == 8) {
      int8_product(x, 1, weight.size(1), weight.data_ptr<int8_t>(), scale.data_ptr<at::BFloat16>(), n, y);
    } else {
      const int64_t k = (weight.size(1) * 8) / (bits == 5 ? 6 : 5);  // row bytes = k * 3/4 or k * 5/8
      if (bits == 5) code_product<float, true>(x, 1, k, weight.data_ptr<uint8_t>(), weight.size(1), n, y);
      else code_product<float, false>(x, 1, k, weight.data_ptr<uint8_t>(), weight.size(1), n, y);
    }
  }
  int64_t outputs() const { return weight.size(0); }
};

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// RMSNorm as model.RMSNorm computes it: x * (w * sqrt(d)) / sqrt(|x|^2 + d * eps).
struct Norm {
  torch::Tensor scaled_weight;  // [d] or [rows, d]: one weight row per vector normed
  float floor_squared;

  void apply(const float* x, float* y, int64_t d, int64_t row = 0) const {
    const float inv = 1.0f / std::sqrt(dot(x, x, d) + floor_squared);
    const float* w = scaled_weight.data_ptr<float>() + row * d;
    for (int64_t i = 0; i < d; ++i) y[i] = x[i] * inv * w[i];
  }
};

// One transformer block for one new token with a KV cache, as model.Model.layer computes it for
// dense families without biases or attention softcaps: the whole block in one call, so a decode
// step pays no per-op dispatch.
class DecodeLayer {
 public:
  DecodeLayer(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double attn_scale, bool neox_rope,
              bool gelu_tanh, std::vector<Matrix> matrices, std::vector<Norm> norms, bool qk_norm, bool post_norms)
      : n_heads_(n_heads), n_kv_(n_kv_heads), hd_(head_dim), attn_scale_(attn_scale), neox_(neox_rope),
        gelu_(gelu_tanh), qk_norm_(qk_norm), post_norms_(post_norms), m_(std::move(matrices)), norms_(std::move(norms)) {
    TORCH_CHECK(m_.size() == 4 && norms_.size() == 5, "a layer takes 4 matrices and 5 norms");
  }

  // x [1, d] float32 -> the block's output [1, d]; writes this token's key and value at write_pos
  // of the slot's caches [kv heads, capacity, hd] and attends over their first n_keys entries.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                        torch::Tensor v_cache, int64_t write_pos, int64_t n_keys) const {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(0) == 1, "x must be float32 [1, d]");
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 && k_cache.is_contiguous() && v_cache.is_contiguous(),
                "caches must be contiguous float32");
    const int64_t d = x.size(1), hd = hd_, nq = n_heads_, nkv = n_kv_, cap = k_cache.size(1);
    const int64_t ff = m_[2].outputs() / 2;
    auto out = torch::empty_like(x);
    float* y = out.data_ptr<float>();
    std::vector<float> h(std::max(d, ff)), qkv((nq + 2 * nkv) * hd), att(nq * hd), proj(d), gu(2 * ff),
        rotated(hd);
    const float *xin = x.data_ptr<float>(), *c = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();

    norms_[0].apply(xin, h.data(), d);
    m_[0].apply(h.data(), qkv.data());
    for (int64_t head = 0; head < nq + nkv; ++head) {  // q/k norm and rope, head by head
      float* v = qkv.data() + head * hd;
      if (qk_norm_) norms_[4].apply(v, v, hd, head);
      for (int64_t j = 0; j < hd; ++j)
        rotated[j] = v[j] * c[j] + v[neox_ ? (j + hd / 2) % hd : (j ^ 1)] * sn[j];
      std::copy(rotated.begin(), rotated.end(), v);
    }
    float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
    for (int64_t g = 0; g < nkv; ++g) {
      std::copy_n(qkv.data() + (nq + g) * hd, hd, kc + (g * cap + write_pos) * hd);
      std::copy_n(qkv.data() + (nq + nkv + g) * hd, hd, vc + (g * cap + write_pos) * hd);
    }
    attend(qkv.data(), kc, vc, cap, n_keys, att.data());
    m_[1].apply(att.data(), proj.data());
    residual_add(xin, proj.data(), y, d, 1);
    norms_[2].apply(y, h.data(), d);
    m_[2].apply(h.data(), gu.data());
    for (int64_t i = 0; i < ff; ++i) h[i] = activation(gu[i]) * gu[ff + i];
    m_[3].apply(h.data(), proj.data());
    residual_add(y, proj.data(), y, d, 3);
    return out;
  }

 private:
  // y = x + (post norm)(p): norms_[which] is the post norm when the family has them.
  void residual_add(const float* x, const float* p, float* y, int64_t d, int which) const {
    std::vector<float> normed(d);
    if (post_norms_) norms_[which].apply(p, normed.data(), d);
    else std::copy_n(p, d, normed.data());
    for (int64_t i = 0; i < d; ++i) y[i] = x[i] + normed[i];
  }
  // Each query head over the first n_keys cached keys of its kv head. The keys are split in parts,
  // one per thread, that each keep their own max, sum and weighted values; the parts are then
  // joined, so both cores read the cache (it can be as large as a layer's weights).
  void attend(const float* q_heads, const float* kc, const float* vc, int64_t cap, int64_t n_keys, float* out) const {
    const int64_t hd = hd_, nq = n_heads_, group = n_heads_ / n_kv_;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_keys / 64));
    std::vector<float> top(parts * nq), total(parts * nq), partial(parts * nq * hd, 0.0f);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> scores(n_keys / parts + 1);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t t0 = p * n_keys / parts, t1 = (p + 1) * n_keys / parts;
        for (int64_t head = 0; head < nq; ++head) {
          const float *q = q_heads + head * hd, *keys = kc + head / group * cap * hd, *values = vc + head / group * cap * hd;
          float m = -INFINITY, sum = 0, *o = partial.data() + (p * nq + head) * hd;
          for (int64_t t = t0; t < t1; ++t) m = std::max(m, scores[t - t0] = attn_scale_ * dot(q, keys + t * hd, hd));
          for (int64_t t = t0; t < t1; ++t) {
            const float e = std::exp(scores[t - t0] - m), *v = values + t * hd;
            sum += e;
            for (int64_t j = 0; j < hd; ++j) o[j] += e * v[j];
          }
          top[p * nq + head] = m;
          total[p * nq + head] = sum;
        }
      }
    });
    for (int64_t head = 0; head < nq; ++head) {
      float m = -INFINITY, sum = 0;
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, top[p * nq + head]);
      std::vector<float> weight(parts);
      for (int64_t p = 0; p < parts; ++p) sum += total[p * nq + head] * (weight[p] = std::exp(top[p * nq + head] - m));
      float* o = out + head * hd;
      std::fill_n(o, hd, 0.0f);
      for (int64_t p = 0; p < parts; ++p) {
        const float w = weight[p] / sum, *part = partial.data() + (p * nq + head) * hd;
        for (int64_t j = 0; j < hd; ++j) o[j] += w * part[j];
      }
    }
  }

  float activation(float v) const {
    if (gelu_) return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return v / (1.0f + std::exp(-v));
  }

  int64_t n_heads_, n_kv_, hd_;
  float attn_scale_;
  bool neox_, gelu_, qk_norm_, post_norms_;
  std::vector<Matrix> m_;  // qkv, attention output, gate and up, down
  std::vector<Norm> norms_;  // attention, post-attention, ffn, post-ffn, q/k (unused entries: empty)
};

void check_activations(const torch::Tensor& x, int64_t k, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU matrix");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be float32 or bf16");
  TORCH_CHECK(x.size(1) == k && k % multiple == 0, "x has ", x.size(1), " inputs; the weights take ", k,
              ", a multiple of ", multiple);
}

}  // namespace

// x [M, K] float32 or bf16 @ int8 weight [N, K].T * scale [N] (bf16) -> float32 [M, N].
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale) {
  check_activations(x, weight.size(1), 64);
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.is_contiguous(), "weight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && scale.numel() == weight.size(0), "scale must be bf16 [N]");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  auto out = torch::empty({m, n}, torch::kFloat32);
  if (x.scalar_type() == torch::kFloat32)
    int8_product(x.data_ptr<float>(), m, k, weight.data_ptr<int8_t>(), scale.data_ptr<at::BFloat16>(), n, out.data_ptr<float>());
  else
    int8_product(x.data_ptr<at::BFloat16>(), m, k, weight.data_ptr<int8_t>(), scale.data_ptr<at::BFloat16>(), n,
                 out.data_ptr<float>());
  return out;
}

// x [M, K] float32 or bf16 @ rows of 4- or 5-bit codes [N, row bytes] -> float32 [M, N].
torch::Tensor code_linear(torch::Tensor x, torch::Tensor codes, int64_t bits) {
  const int64_t k = x.size(1);
  TORCH_CHECK(bits == 4 || bits == 5, "codes are 4 or 5 bits, not ", bits);
  check_activations(x, k, 128);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
              codes.size(1) == code_row_bytes(k, bits == 5), "codes must be contiguous uint8 [N, ",
              code_row_bytes(k, bits == 5), "] for ", k, " inputs");
  const int64_t m = x.size(0), n = codes.size(0), row_bytes = codes.size(1);
  auto out = torch::empty({m, n}, torch::kFloat32);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  if (x.scalar_type() == torch::kFloat32) {
    if (bits == 5) code_product<float, true>(x.data_ptr<float>(), m, k, w, row_bytes, n, y);
    else code_product<float, false>(x.data_ptr<float>(), m, k, w, row_bytes, n, y);
  } else {
    if (bits == 5) code_product<at::BFloat16, true>(x.data_ptr<at::BFloat16>(), m, k, w, row_bytes, n, y);
    else code_product<at::BFloat16, false>(x.data_ptr<at::BFloat16>(), m, k, w, row_bytes, n, y);
  }
  return out;
}

// Rows of 4- or 5-bit codes [N, row bytes] for k inputs -> bf16 [N, k], for many-row products.
torch::Tensor code_dequantize(torch::Tensor codes, int64_t bits, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 5, "codes are 4 or 5 bits, not ", bits);
  TORCH_CHECK(k % 128 == 0 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
              codes.size(1) == code_row_bytes(k, bits == 5), "codes must be contiguous uint8 [N, ",
              code_row_bytes(k, bits == 5), "] for ", k, " inputs");
  const int64_t n = codes.size(0);
  auto out = torch::empty({n, k}, torch::kBFloat16);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  at::BFloat16* y = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, std::max<int64_t>(1, MIN_TASK / k), [&](int64_t r0, int64_t r1) {
    if (bits == 5) dequantize_rows<true>(w, codes.size(1), k, r0, r1, y);
    else dequantize_rows<false>(w, codes.size(1), k, r0, r1, y);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear);
  m.def("code_linear", &code_linear);
  m.def("code_dequantize", &code_dequantize);
  py::class_<Matrix>(m, "Matrix").def(py::init<torch::Tensor, torch::Tensor, int64_t>());
  py::class_<Norm>(m, "Norm").def(py::init<torch::Tensor, float>());
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<int64_t, int64_t, int64_t, double, bool, bool, std::vector<Matrix>, std::vector<Norm>, bool, bool>())
      .def("__call__", &DecodeLayer::forward);
}
