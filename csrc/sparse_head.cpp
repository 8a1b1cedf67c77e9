// NanoSpec native CPU sparse draft head: fused gather + dot (fp32 accumulation) + argmax over the active ids.
//
// sparse_head(hidden [B, H], weight [Vw, H] (bf16/fp16/fp32, rows contiguous), ids [B, C] (int32/int64, -1
// padded), counts [B], row_index [V] or None) -> (scores [B, C] fp32 (-inf where invalid), token [B] int64 (-1
// when a row has no candidate), best [B] fp32); poison=True pre-fills the outputs with NaN (tests).
// Semantics: nanospec_vllm/ops/reference.py (ties -> lowest id).
//
// Work: the valid (row, candidate) pairs of the whole batch are flattened and split over all threads with
// at::parallel_for, so a batch of one still uses every core. Each pair reads one weight row straight from the
// head (no gather copy) and converts it to fp32 in registers. The dot kernel is chosen at run time (AVX-512,
// AVX2+FMA+F16C, or portable scalar code) from the CPU's features, so the build needs no -march flag.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define NANOSPEC_X86 1
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class WKind { kBF16, kF16, kF32 };

// ---------------------------------------------------------------- portable scalar dots
inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <WKind K>
float dot_scalar(const void* wv, const float* h, int64_t H) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  auto load = [&](int64_t j) -> float {
    if constexpr (K == WKind::kBF16) {
      return bf16_to_float(static_cast<const uint16_t*>(wv)[j]);
    } else if constexpr (K == WKind::kF16) {
      return static_cast<float>(static_cast<const c10::Half*>(wv)[j]);
    } else {
      return static_cast<const float*>(wv)[j];
    }
  };
  for (; i + 8 <= H; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += load(i + k) * h[i + k];
  float tail = 0.f;
  for (; i < H; ++i) tail += load(i) * h[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

#ifdef NANOSPEC_X86
// ---------------------------------------------------------------- AVX-512 (F + BW + VL for masked tails)
#define NS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

template <WKind K>
NS_AVX512 inline __m512 load16_avx512(const void* wv, int64_t i) {
  if constexpr (K == WKind::kBF16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(wv) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else if constexpr (K == WKind::kF16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(wv) + i));
    return _mm512_cvtph_ps(raw);
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(wv) + i);
  }
}

template <WKind K>
NS_AVX512 inline __m512 load16_masked_avx512(const void* wv, int64_t i, __mmask16 m) {
  if constexpr (K == WKind::kBF16) {
    __m256i raw = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(wv) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else if constexpr (K == WKind::kF16) {
    __m256i raw = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(wv) + i);
    return _mm512_cvtph_ps(raw);
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(wv) + i);
  }
}

template <WKind K>
NS_AVX512 float dot_avx512(const void* wv, const float* h, int64_t H) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= H; i += 64) {
    a0 = _mm512_fmadd_ps(load16_avx512<K>(wv, i), _mm512_loadu_ps(h + i), a0);
    a1 = _mm512_fmadd_ps(load16_avx512<K>(wv, i + 16), _mm512_loadu_ps(h + i + 16), a1);
    a2 = _mm512_fmadd_ps(load16_avx512<K>(wv, i + 32), _mm512_loadu_ps(h + i + 32), a2);
    a3 = _mm512_fmadd_ps(load16_avx512<K>(wv, i + 48), _mm512_loadu_ps(h + i + 48), a3);
  }
  for (; i + 16 <= H; i += 16) a0 = _mm512_fmadd_ps(load16_avx512<K>(wv, i), _mm512_loadu_ps(h + i), a0);
  if (i < H) {
    __mmask16 m = static_cast<__mmask16>((1u << (H - i)) - 1u);
    a1 = _mm512_fmadd_ps(load16_masked_avx512<K>(wv, i, m), _mm512_maskz_loadu_ps(m, h + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// ---------------------------------------------------------------- AVX2 + FMA + F16C
#define NS_AVX2 __attribute__((target("avx2,fma,f16c")))

template <WKind K>
NS_AVX2 inline __m256 load8_avx2(const void* wv, int64_t i) {
  if constexpr (K == WKind::kBF16) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(wv) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else if constexpr (K == WKind::kF16) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(wv) + i));
    return _mm256_cvtph_ps(raw);
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(wv) + i);
  }
}

NS_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <WKind K>
NS_AVX2 float dot_avx2(const void* wv, const float* h, int64_t H) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= H; i += 32) {
    a0 = _mm256_fmadd_ps(load8_avx2<K>(wv, i), _mm256_loadu_ps(h + i), a0);
    a1 = _mm256_fmadd_ps(load8_avx2<K>(wv, i + 8), _mm256_loadu_ps(h + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8_avx2<K>(wv, i + 16), _mm256_loadu_ps(h + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8_avx2<K>(wv, i + 24), _mm256_loadu_ps(h + i + 24), a3);
  }
  for (; i + 8 <= H; i += 8) a0 = _mm256_fmadd_ps(load8_avx2<K>(wv, i), _mm256_loadu_ps(h + i), a0);
  float tail = 0.f;
  if (i < H) tail = dot_scalar<K>(static_cast<const char*>(wv) + i * (K == WKind::kF32 ? 4 : 2), h + i, H - i);
  return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
}
#endif  // NANOSPEC_X86

using DotFn = float (*)(const void*, const float*, int64_t);

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef NANOSPEC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;  // f16c comes with both
#endif
  return Isa::kScalar;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

template <WKind K>
DotFn pick_dot() {
#ifdef NANOSPEC_X86
  switch (isa()) {
    case Isa::kAvx512:
      return &dot_avx512<K>;
    case Isa::kAvx2:
      return &dot_avx2<K>;
    default:
      break;
  }
#endif
  return &dot_scalar<K>;
}

DotFn dot_for(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return pick_dot<WKind::kBF16>();
    case at::kHalf:
      return pick_dot<WKind::kF16>();
    case at::kFloat:
      return pick_dot<WKind::kF32>();
    default:
      TORCH_CHECK(false, "nanospec sparse_head: weight dtype must be bf16, fp16 or fp32, got ", t);
  }
}

template <typename I>
inline int64_t read_index(const void* p, int64_t i) {
  return static_cast<int64_t>(static_cast<const I*>(p)[i]);
}

using ReadFn = int64_t (*)(const void*, int64_t);

ReadFn reader_for(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kInt:
      return &read_index<int32_t>;
    case at::kLong:
      return &read_index<int64_t>;
    default:
      TORCH_CHECK(false, "nanospec sparse_head: ", what, " must be int32 or int64, got ", t.scalar_type());
  }
}

std::vector<at::Tensor> sparse_head(const at::Tensor& hidden_in, const at::Tensor& weight, const at::Tensor& ids_in,
                                    const at::Tensor& counts_in, const c10::optional<at::Tensor>& row_index_in,
                                    bool poison) {
  TORCH_CHECK(hidden_in.device().is_cpu() && weight.device().is_cpu() && ids_in.device().is_cpu() &&
                  counts_in.device().is_cpu(),
              "nanospec sparse_head (native): CPU tensors expected");
  TORCH_CHECK(hidden_in.dim() == 2 && weight.dim() == 2 && hidden_in.size(1) == weight.size(1),
              "hidden [B, H] and weight [V, H] expected");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == hidden_in.size(0), "ids [B, C] expected");
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == hidden_in.size(0), "counts [B] expected");
  TORCH_CHECK(weight.size(1) == 0 || weight.stride(1) == 1, "weight rows must be contiguous");

  const int64_t B = ids_in.size(0), C = ids_in.size(1), H = weight.size(1), Vw = weight.size(0);
  const at::Tensor hidden = hidden_in.to(at::kFloat).contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  at::Tensor row_index;
  const bool has_ri = row_index_in.has_value() && row_index_in->defined();
  if (has_ri) {
    row_index = row_index_in->contiguous();
    TORCH_CHECK(row_index.device().is_cpu() && row_index.dim() == 1, "row_index [V] on CPU expected");
  }

  auto fopts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor scores = at::empty({B, C}, fopts);
  at::Tensor token = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  at::Tensor best = at::empty({B}, fopts);
  if (poison) {  // tests: any output the kernel fails to write stays NaN / a nonsense id
    scores.fill_(std::numeric_limits<float>::quiet_NaN());
    token.fill_(int64_t{0x5EED5EED5EED});
    best.fill_(std::numeric_limits<float>::quiet_NaN());
  }

  const DotFn dot = dot_for(weight.scalar_type());
  const ReadFn read_id = reader_for(ids, "ids");
  const ReadFn read_ri = has_ri ? reader_for(row_index, "row_index") : nullptr;
  const int64_t V_ri = has_ri ? row_index.size(0) : 0;
  const void* ri_ptr = has_ri ? row_index.data_ptr() : nullptr;
  const void* ids_ptr = ids.data_ptr();
  const char* w_ptr = static_cast<const char*>(weight.data_ptr());
  const int64_t w_row_bytes = weight.stride(0) * weight.element_size();
  const float* h_ptr = hidden.data_ptr<float>();
  float* s_ptr = scores.data_ptr<float>();
  const int64_t* c_ptr = counts.data_ptr<int64_t>();

  // Flatten the valid (b, c) pairs: row b owns [prefix[b], prefix[b + 1]).
  std::vector<int64_t> prefix(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) prefix[b + 1] = prefix[b] + std::min(std::max<int64_t>(c_ptr[b], 0), C);
  const int64_t total = prefix[B];

  // Resolve a candidate to its weight row, or -1 when it is skipped.
  auto row_of = [&](int64_t b, int64_t c) -> int64_t {
    const int64_t t = read_id(ids_ptr, b * C + c);
    if (t < 0) return -1;
    int64_t r = t;
    if (has_ri) {
      if (t >= V_ri) return -1;
      r = read_ri(ri_ptr, t);
    }
    return (r >= 0 && r < Vw) ? r : -1;
  };

  // Software prefetch: the rows are scattered, so the hardware prefetcher only helps inside a row. Keep about
  // 16 KB of upcoming rows in flight (9 rows of 896 bf16, 2 rows of 4096 bf16); measured 2-3x on short rows.
  const int64_t row_bytes = H * weight.element_size();
  const int64_t pf_dist = std::min<int64_t>(16, std::max<int64_t>(2, 16384 / std::max<int64_t>(row_bytes, 1)));

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1));  // ~32k MACs per task at least
  at::parallel_for(0, total, grain, [&](int64_t lo, int64_t hi) {
    int64_t b = std::upper_bound(prefix.begin(), prefix.end(), lo) - prefix.begin() - 1;
    int64_t pb = b;  // the prefetch cursor's batch row
    auto prefetch = [&](int64_t q) {
      if (q >= hi) return;
      while (q >= prefix[pb + 1]) ++pb;
      const int64_t r = row_of(pb, q - prefix[pb]);
      if (r < 0) return;
      const char* base = w_ptr + r * w_row_bytes;
      for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(base + off, 0, 3);
    };
    for (int64_t q = lo; q < std::min(hi, lo + pf_dist); ++q) prefetch(q);
    for (int64_t p = lo; p < hi; ++p) {
      prefetch(p + pf_dist);
      while (p >= prefix[b + 1]) ++b;
      const int64_t c = p - prefix[b];
      const int64_t r = row_of(b, c);
      s_ptr[b * C + c] = r < 0 ? kNegInf : dot(w_ptr + r * w_row_bytes, h_ptr + b * H, H);
    }
  });

  // Per row: -inf past counts[b], then argmax with ties to the lowest id.
  int64_t* tok_ptr = token.data_ptr<int64_t>();
  float* best_ptr = best.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t n = prefix[b + 1] - prefix[b];
      float* row = s_ptr + b * C;
      std::fill(row + n, row + C, kNegInf);
      float m = kNegInf;
      int64_t id = -1;
      for (int64_t c = 0; c < n; ++c) {
        const float v = row[c];
        if (!(v > kNegInf)) continue;
        const int64_t t = read_id(ids_ptr, b * C + c);
        if (v > m || (v == m && t < id)) {
          m = v;
          id = t;
        }
      }
      tok_ptr[b] = id;
      best_ptr[b] = id >= 0 ? m : kNegInf;
    }
  });
  return {scores, token, best};
}

std::string isa_name() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "NanoSpec native CPU sparse draft head";
  m.def("sparse_head", &sparse_head, "fused gather + dot + argmax over the active ids (CPU)", py::arg("hidden"),
        py::arg("weight"), py::arg("ids"), py::arg("counts"), py::arg("row_index") = py::none(), py::arg("poison") = false);
  m.def("isa", &isa_name, "the dot-product kernel chosen for this CPU");
}
