// Low-bit matrix products for a decode step on x86 CPUs, and one whole transformer block for one token.
//
// A decode step multiplies one (or a few) activation rows by every weight matrix, so its speed is
// the rate at which weight bytes are turned into dot products. Torch's weight-only kernels convert
// each weight to floating point first and run out of instructions before memory runs out of
// bandwidth. Here the activations are quantized to int8 in blocks of 32 inputs (one float scale per
// block, as llama.cpp's Q8_0, plus an int8 residual for precision), and integer byte dot products
// turn the weight bytes into sums as they arrive: vpdpbusd, 64 bytes by 64 in one instruction, on
// AVX-512 VNNI (cpu_kernels_avx512.h), vpmaddubsw and vpmaddwd, 32 at a time, on AVX2
// (cpu_kernels_avx2.h). kernels.py builds this file for the one the CPU has.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // inputs per activation scale, and per group of codes
constexpr int64_t MIN_TASK = 16384;  // weights per parallel task, so small products stay on one thread

// One activation row, quantized for one kernel's weight layout.
//   int8 rows: inputs in order; 16 lane scales / 256 per 64 inputs (lanes 0-7 the first block's).
//   codes: per 128 inputs (4 groups), 64 bytes of each group's first 16 inputs, then 64 bytes of
//   each group's last 16; 16 lane scales / 256 per 128 inputs (4 lanes per group).
// Per block, the scale times the block's sum: the codes' mins and the AVX-512 int8 weights' +128 offset
// (`offset`, their sum times 128) are undone with it.
struct ActivationRow {
  std::vector<int8_t> q, r;
  std::vector<float> lane_scales, scaled_sums;
  float offset = 0;
};

#if defined(__AVX512VNNI__)
#include "cpu_kernels_avx512.h"
#elif defined(__AVX2__)
#include "cpu_kernels_avx2.h"
#else
#error "OpenLPU's CPU kernels are written for AVX-512 VNNI or AVX2"
#endif

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
    // a NaN or infinite input makes the products NaN, as a float product would make them NaN or infinite; the
    // blocks' maximum alone drops NaNs (vmaxps returns its second operand) and gives finite garbage
    if (!std::all_of(x + b * BLOCK, x + (b + 1) * BLOCK, [](T v) { return std::isfinite(static_cast<float>(v)); }))
      s = NAN;
    for (int l = 0; l < lanes; ++l) row.lane_scales[b * lanes + l] = s / 256.0f;
    row.scaled_sums[b] = s * sum;
    row.offset += 128.0f * row.scaled_sums[b];
  }
  return row;
}

// ---- products ----------------------------------------------------------------------------------

// y [m, n] = x [m, k] @ int8 rows w [n, k].T * scale.
template <typename T>
void int8_product(const T* x, int64_t m, int64_t k, const int8_t* w, const at::BFloat16* scale, int64_t n,
                  float* y) {
  std::vector<ActivationRow> rows;
  for (int64_t i = 0; i < m; ++i) rows.push_back(quantize_row(x + i * k, k, false));
  at::parallel_for(0, (n + 3) / 4, std::max<int64_t>(1, MIN_TASK / (4 * k)), [&](int64_t q0, int64_t q1) {
    for (int64_t r = q0 * 4; r < std::min(q1 * 4, n); r += 4) {  // 4 weight rows, read once for all m rows
      for (int64_t i = 0; i < m; ++i) {
        if (r + 4 <= n) int8_rows<4>(w + r * k, k, rows[i], scale + r, y + i * n + r);
        else for (int64_t t = r; t < n; ++t) int8_rows<1>(w + t * k, k, rows[i], scale + t, y + i * n + t);
      }
    }
  });
}

// Bytes of one row of codes.
inline int64_t code_row_bytes(int64_t k, bool fifth_bit) { return k / 2 + (fifth_bit ? k / 8 : 0) + k / 8; }

// Rows r0..r1 of codes -> code * scale + min, k values each.
template <bool FIFTH_BIT, typename Out>
void dequantize_rows(const uint8_t* rows, int64_t row_bytes, int64_t k, int64_t r0, int64_t r1, Out* out) {
  const CodeUnpacker codes;
  const int64_t groups = k / BLOCK, scales_at = k / 2 + (FIFTH_BIT ? k / 8 : 0);
  uint8_t lo[64], hi[64];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = rows + r * row_bytes;
    const at::Half* scales = reinterpret_cast<const at::Half*>(row + scales_at);
    for (int64_t c = 0; c < k; c += 128) {
      codes.unpack_bytes<FIFTH_BIT>(row, k, c, lo, hi);
      for (int g = 0; g < 4; ++g) {
        const int64_t group = c / BLOCK + g;
        const float scale = static_cast<float>(scales[group]), min = static_cast<float>(scales[groups + group]);
        dequantize16(lo + 16 * g, scale, min, out + r * k + group * BLOCK);
        dequantize16(hi + 16 * g, scale, min, out + r * k + group * BLOCK + 16);
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
    for (int64_t r = q0 * 4; r < std::min(q1 * 4, n); r += 4) {  // 4 weight rows, read once for all m rows
      for (int64_t i = 0; i < m; ++i) {
        if (r + 4 <= n) code_rows<4, FIFTH_BIT>(w + r * row_bytes, row_bytes, k, rows[i], unpacker, y + i * n + r);
        else for (int64_t t = r; t < n; ++t)
          code_rows<1, FIFTH_BIT>(w + t * row_bytes, row_bytes, k, rows[i], unpacker, y + i * n + t);
      }
    }
  });
}

// One weight matrix as the layer kernel runs it: int8 rows (bits 8, with scale) or codes (4, 5), whose
// layout may add zero-weight inputs past the layer's vector (`padding`, kernels.Linear's).
struct Matrix {
  torch::Tensor weight, scale;
  int64_t bits, padding;

  void apply(const float* x, float* y) const {
    const int64_t n = weight.size(0);
    if (bits == 8) {
      int8_product(x, 1, weight.size(1), weight.data_ptr<int8_t>(), scale.data_ptr<at::BFloat16>(), n, y);
    } else {
      const int64_t k = (weight.size(1) * 8) / (bits == 5 ? 6 : 5);  // row bytes = k * 3/4 or k * 5/8
      std::vector<float> padded;
      if (padding) {
        padded.assign(k, 0.0f);
        std::copy_n(x, k - padding, padded.data());
        x = padded.data();
      }
      if (bits == 5) code_product<float, true>(x, 1, k, weight.data_ptr<uint8_t>(), weight.size(1), n, y);
      else code_product<float, false>(x, 1, k, weight.data_ptr<uint8_t>(), weight.size(1), n, y);
    }
  }
  int64_t outputs() const { return weight.size(0); }
};

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

// Rows of 4- or 5-bit codes [N, row bytes] for k inputs -> [N, k] bf16 (or float32 where bf16 products are
// slow), for many-row products.
torch::Tensor code_dequantize(torch::Tensor codes, int64_t bits, int64_t k, bool float32) {
  TORCH_CHECK(bits == 4 || bits == 5, "codes are 4 or 5 bits, not ", bits);
  TORCH_CHECK(k % 128 == 0 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
              codes.size(1) == code_row_bytes(k, bits == 5), "codes must be contiguous uint8 [N, ",
              code_row_bytes(k, bits == 5), "] for ", k, " inputs");
  const int64_t n = codes.size(0), row_bytes = codes.size(1);
  auto out = torch::empty({n, k}, float32 ? torch::kFloat32 : torch::kBFloat16);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, MIN_TASK / k), [&](int64_t r0, int64_t r1) {
    if (float32 && bits == 5) dequantize_rows<true>(w, row_bytes, k, r0, r1, out.data_ptr<float>());
    else if (float32) dequantize_rows<false>(w, row_bytes, k, r0, r1, out.data_ptr<float>());
    else if (bits == 5) dequantize_rows<true>(w, row_bytes, k, r0, r1, out.data_ptr<at::BFloat16>());
    else dequantize_rows<false>(w, row_bytes, k, r0, r1, out.data_ptr<at::BFloat16>());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear);
  m.def("code_linear", &code_linear);
  m.def("code_dequantize", &code_dequantize);
  py::class_<Matrix>(m, "Matrix").def(py::init<torch::Tensor, torch::Tensor, int64_t, int64_t>());
  py::class_<Norm>(m, "Norm").def(py::init<torch::Tensor, float>());
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<int64_t, int64_t, int64_t, double, bool, bool, std::vector<Matrix>, std::vector<Norm>, bool, bool>())
      .def("__call__", &DecodeLayer::forward);
}
