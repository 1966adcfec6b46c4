// The binary sign of training and its surrogate gradients, one pass each (irconvert/fused/sign.py).
//
//   forward:  y = +1 where x >= 0, else -1 (sign(0) = +1; NaN gives -1, as !(NaN >= 0))
//   backward: dL/dx = g * d(x), d one of
//     ede     k * t * (1 - tanh^2(t x))    IR-Net's EDE, written 4 k t e / (1 + e)^2, e = exp(-2 |t x|)
//     ste     1{|x| <= 1}                  the clipped straight-through estimator (g * 0 or g * 1, as PyTorch's mul)
//     approx  max(0, 2 - 2 |x|)            Bi-Real Net's ApproxSign
//   clip (a Hardtanh(-1, 1) in front of the sign, fused away: sign(hardtanh x) = sign x): the result is 0
//   unless -1 < x < 1, as PyTorch's hardtanh_backward selects it (boundaries and NaN give 0, as its
//   vectorized loop does; g * d(x) does not matter there, NaN or not)
//
// Math runs in float32 for float32, bfloat16 and float16 tensors; the result is rounded once to
// the tensor's dtype. exp is our own (range reduction to 2^n * 2^f, |f| <= 1/2, degree-7
// polynomial, relative error ~1e-8) so that the loop is plain arithmetic the compiler vectorizes
// with -O3 -march=native, where libm's expf would be a scalar call per element.
// Tensors are read in memory order: the caller passes dense tensors of equal strides.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstring>
#include <vector>
#include <type_traits>

// Lets GCC vectorize the loops below (the exp clamp and floor otherwise keep them scalar: 7 ns per
// element for EDE's backward instead of about 1). It changes no value: every op is still IEEE, only
// floating-point exception flags, which nothing here reads, may differ. After the includes: torch's
// own headers keep their flags.
#pragma GCC optimize("no-trapping-math")

namespace {

constexpr int64_t kGrain = 1 << 15;

inline float exp_nonpositive(float y) {
  // e^y for y <= 0; below -87 the result is under float's normal range and sech^2 is ~0 anyway
  y = y < -87.0f ? -87.0f : y;
  const float z = y * 1.4426950408889634f;
  const float n = __builtin_floorf(z + 0.5f);
  const float f = (z - n) * 0.6931471805599453f;  // e^f, |f| <= ln2 / 2
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// EDE's k t (1 - tanh^2(t x)) = 4 k t e / (1 + e)^2, e = exp(-2 |t x|); kt4 = 4 k t
inline float ede_factor(float x, float t, float kt4) {
  const float e = exp_nonpositive(-2.0f * __builtin_fabsf(t * x));
  const float q = 1.0f + e;
  return kt4 * e / (q * q);
}

inline float ste_factor(float x) { return __builtin_fabsf(x) <= 1.0f ? 1.0f : 0.0f; }

inline float approx_factor(float x) {
  const float d = 2.0f - 2.0f * __builtin_fabsf(x);
  return d < 0.0f ? 0.0f : d;  // NaN stays NaN, as clamp
}

// bfloat16 <-> float by their bits, as c10::BFloat16 converts (round to nearest even, NaN to 0x7FC0),
// written as integer arithmetic that the compiler vectorizes: the float loops below then run on blocks
// converted in and out, where with c10's scalar conversions in the loop EDE's backward took ~4 ns an element
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// Each range is a plain function of restrict pointers and by-value scalars: inside a lambda that
// captures by reference, the compiler must assume a store to y may change x, t or k, and does not vectorize.
template <typename T>
void sign_range(const T* __restrict__ x, T* __restrict__ y, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {  // on the bits: vectorized
    for (int64_t i = begin; i < end; ++i)
      y[i].x = bf16_bits_to_float(x[i].x) >= 0.0f ? static_cast<uint16_t>(0x3F80) : static_cast<uint16_t>(0xBF80);
  } else {
    const T plus(1.0f), minus(-1.0f);
    for (int64_t i = begin; i < end; ++i) y[i] = static_cast<float>(x[i]) >= 0.0f ? plus : minus;
  }
}

// 0 where a Hardtanh(-1, 1) in front of the sign passes no gradient (its boundaries included, as PyTorch's)
template <bool Clip>
inline float clipped(float x, float v) {
  return Clip && !(x > -1.0f && x < 1.0f) ? 0.0f : v;
}

template <typename T, bool Clip>
void ede_range(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out, int64_t begin, int64_t end,
               float t, float kt4) {
  for (int64_t i = begin; i < end; ++i) {
    const float xf = static_cast<float>(x[i]);
    out[i] = static_cast<T>(clipped<Clip>(xf, static_cast<float>(g[i]) * ede_factor(xf, t, kt4)));
  }
}

template <typename T, bool Clip>
void ste_range(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float xf = static_cast<float>(x[i]);
    out[i] = static_cast<T>(clipped<Clip>(xf, static_cast<float>(g[i]) * ste_factor(xf)));
  }
}

template <typename T, bool Clip>
void approx_range(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float xf = static_cast<float>(x[i]);
    out[i] = static_cast<T>(clipped<Clip>(xf, static_cast<float>(g[i]) * approx_factor(xf)));
  }
}

template <typename T>
void sign_loop(const T* x, T* y, int64_t n) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) { sign_range(x, y, begin, end); });
}

template <typename T, bool Clip>
void grad_range(const T* g, const T* x, T* out, int64_t begin, int64_t end, int mode, float t, float kt4) {
  if (mode == 0) ede_range<T, Clip>(g, x, out, begin, end, t, kt4);
  else if (mode == 1) ste_range<T, Clip>(g, x, out, begin, end);
  else approx_range<T, Clip>(g, x, out, begin, end);
}

constexpr int64_t kBlock = 512;

template <bool Clip>
void grad_range_bf16(const at::BFloat16* g, const at::BFloat16* x, at::BFloat16* out, int64_t begin, int64_t end,
                     int mode, float t, float kt4) {
  float gb[kBlock], xb[kBlock], ob[kBlock];
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t m = std::min(kBlock, end - i);
    for (int64_t j = 0; j < m; ++j) {
      gb[j] = bf16_bits_to_float(g[i + j].x);
      xb[j] = bf16_bits_to_float(x[i + j].x);
    }
    grad_range<float, Clip>(gb, xb, ob, 0, m, mode, t, kt4);
    for (int64_t j = 0; j < m; ++j) out[i + j].x = float_to_bf16_bits(ob[j]);
  }
}

template <typename T, bool Clip>
void grad_loop(const T* g, const T* x, T* out, int64_t n, int mode, float t, float k) {
  const float kt4 = 4.0f * k * t;
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, at::BFloat16>) grad_range_bf16<Clip>(g, x, out, begin, end, mode, t, kt4);
    else grad_range<T, Clip>(g, x, out, begin, end, mode, t, kt4);
  });
}

#define IRC_DISPATCH(dtype, NAME, ...)                                                    \
  switch (dtype) {                                                                       \
    case at::kFloat: { using scalar = float; __VA_ARGS__; break; }                       \
    case at::kBFloat16: { using scalar = at::BFloat16; __VA_ARGS__; break; }             \
    case at::kHalf: { using scalar = at::Half; __VA_ARGS__; break; }                     \
    default: TORCH_CHECK(false, NAME ": float32, bfloat16 or float16 tensors only");      \
  }

torch::Tensor sign_forward(const torch::Tensor& x) {
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "sign_forward: a dense tensor");
  auto y = torch::empty_like(x);  // keeps x's strides, so memory order matches
  IRC_DISPATCH(x.scalar_type(), "sign_forward",
               sign_loop<scalar>(x.data_ptr<scalar>(), y.data_ptr<scalar>(), x.numel()));
  return y;
}

torch::Tensor sign_backward(const torch::Tensor& g, const torch::Tensor& x, int64_t mode, double t, double k,
                            bool clip) {
  TORCH_CHECK(x.is_non_overlapping_and_dense() && g.strides() == x.strides() && g.scalar_type() == x.scalar_type(),
              "sign_backward: dense g and x of one dtype and layout");
  TORCH_CHECK(mode >= 0 && mode <= 2, "sign_backward: mode 0 (ede), 1 (ste) or 2 (approx)");
  auto out = torch::empty_like(x);
  const auto loop = [&](auto clip_tag) {
    constexpr bool Clip = decltype(clip_tag)::value;
    IRC_DISPATCH(x.scalar_type(), "sign_backward",
                 grad_loop<scalar, Clip>(g.data_ptr<scalar>(), x.data_ptr<scalar>(), out.data_ptr<scalar>(), x.numel(),
                                         static_cast<int>(mode), static_cast<float>(t), static_cast<float>(k)));
  };
  if (clip) loop(std::true_type{});
  else loop(std::false_type{});
  return out;
}


// ---- Libra-PB, one output channel (a row of the weight as [out, fan-in]) at a time (methods/libra_pb.py) ----
//
//   mu = sum(w) / n,  c = w - mu,  var = sum(c * c) / (n - 1) (0 for n = 1),  r = 1 / sqrt(var) (0 where var <= 0)
//   (r in double, rounded once: float sqrt need not be correctly rounded in PyTorch's vector code)
//   w_hat = c * r,  m = sum(|w_hat|) / n,  s = 2^e, e = round(log2 m) (0 where m = 0), clamped to [-64, 63]
//   Q = +s where w_hat >= 0, else -s
//
// The sums run in double, over 8 lanes in a fixed order, and are rounded once to float: the same float
// as PyTorch's float64 sums of libra.balance_stats and libra.scale_exponent but where the exact sum lies
// within ~1e-13 of a float's rounding boundary. Everything else is float32, op for op as there.
// round(log2 m) is exact: with m = f 2^x, f in [0.5, 1), it is x where f > 2^-1/2, else x - 1
// (0.70710677f, the float just below 2^-1/2, is never equal to it).

constexpr int kLanes = 8;
constexpr int kExpMin = -64, kExpMax = 63;  // libra.EXP_MIN, EXP_MAX: the packed file's int8

template <typename F>
inline float lane_mean(int64_t n, int64_t divisor, F term) {
  double acc[kLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(term(i + j));
  for (; i < n; ++i) acc[0] += static_cast<double>(term(i));
  const double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  return static_cast<float>(sum / static_cast<double>(divisor));
}

inline int libra_exponent(float m) {
  if (!(m > 0.0f)) return 0;  // 0 (a constant channel) or NaN
  if (std::isinf(m)) return kExpMax;
  int x = 0;
  const float f = std::frexp(m, &x);
  const int e = f > 0.70710677f ? x : x - 1;
  return e < kExpMin ? kExpMin : (e > kExpMax ? kExpMax : e);
}

void libra_row(const float* __restrict__ w, float* __restrict__ q, int64_t n, float* mu_out, float* r_out,
               float* s_out) {
  const float mu = lane_mean(n, n, [w](int64_t i) { return w[i]; });
  const float var = n > 1 ? lane_mean(n, n - 1, [w, mu](int64_t i) { const float c = w[i] - mu; return c * c; }) : 0.0f;
  const float r = var > 0.0f ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(var))) : 0.0f;
  const float m = lane_mean(n, n, [w, mu, r](int64_t i) { return __builtin_fabsf((w[i] - mu) * r); });
  const float s = std::ldexp(1.0f, libra_exponent(m));
  for (int64_t i = 0; i < n; ++i) q[i] = (w[i] - mu) * r >= 0.0f ? s : -s;
  *mu_out = mu;
  *r_out = r;
  *s_out = s;
}

// w [out, n] float32 -> (Q [out, n], mu [out, 1], r [out, 1], s [out])
std::vector<torch::Tensor> libra_forward(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat,
              "libra_forward: a contiguous float32 [out, fan-in] weight");
  const int64_t rows = w.size(0), n = w.size(1);
  auto q = torch::empty_like(w);
  auto mu = torch::empty({rows, 1}, w.options()), r = torch::empty({rows, 1}, w.options());
  auto s = torch::empty({rows}, w.options());
  const float* wp = w.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *mup = mu.data_ptr<float>(), *rp = r.data_ptr<float>(), *sp = s.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [=](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) libra_row(wp + o * n, qp + o * n, n, mup + o, rp + o, sp + o);
  });
  return {q, mu, r, s};
}

//   g_hat = d(w_hat) * s * dL/dQ,   dL/dw = r * (g_hat - mean(g_hat) - w_hat * sum(g_hat * w_hat) / (n - 1))
template <int Mode>
void libra_row_grad(const float* __restrict__ w, const float* __restrict__ gq, float* __restrict__ out, int64_t n,
                    float mu, float r, float s, float t, float kt4) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = (w[i] - mu) * r;
    const float g = gq[i] * s;
    out[i] = g * (Mode == 0 ? ede_factor(x, t, kt4) : (Mode == 1 ? ste_factor(x) : approx_factor(x)));
  }
  const float mean = lane_mean(n, n, [out](int64_t i) { return out[i]; });
  const float dot = lane_mean(n, std::max<int64_t>(n - 1, 1),
                              [out, w, mu, r](int64_t i) { return out[i] * ((w[i] - mu) * r); });
  for (int64_t i = 0; i < n; ++i) out[i] = (out[i] - mean - ((w[i] - mu) * r) * dot) * r;
}

torch::Tensor libra_backward(const torch::Tensor& w, const torch::Tensor& grad_q, const torch::Tensor& mu,
                             const torch::Tensor& r, const torch::Tensor& s, int64_t mode, double t, double k) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat && grad_q.sizes() == w.sizes()
              && grad_q.is_contiguous() && grad_q.scalar_type() == at::kFloat,
              "libra_backward: contiguous float32 [out, fan-in] weight and gradient");
  TORCH_CHECK(mode >= 0 && mode <= 2, "libra_backward: mode 0 (ede), 1 (ste) or 2 (approx)");
  const int64_t rows = w.size(0), n = w.size(1);
  auto mu_c = mu.contiguous(), r_c = r.contiguous(), s_c = s.contiguous();
  auto out = torch::empty_like(w);
  const float *wp = w.data_ptr<float>(), *gp = grad_q.data_ptr<float>();
  const float *mup = mu_c.data_ptr<float>(), *rp = r_c.data_ptr<float>(), *sp = s_c.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float tf = static_cast<float>(t), kt4 = 4.0f * static_cast<float>(k) * tf;
  const int md = static_cast<int>(mode);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [=](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t off = o * n;
      if (md == 0) libra_row_grad<0>(wp + off, gp + off, op + off, n, mup[o], rp[o], sp[o], tf, kt4);
      else if (md == 1) libra_row_grad<1>(wp + off, gp + off, op + off, n, mup[o], rp[o], sp[o], tf, kt4);
      else libra_row_grad<2>(wp + off, gp + off, op + off, n, mup[o], rp[o], sp[o], tf, kt4);
    }
  });
  return out;
}

// ---- Q = s * (+-1) per row kept for the backward as sign bits (fused/saved.py) ----
// bit j of byte b is the sign bit of element 8 b + j (memory order of a contiguous tensor)

template <typename T>
void signbit_range(const T* __restrict__ x, uint8_t* __restrict__ bits, int64_t n, int64_t begin, int64_t end) {
  int64_t b = begin;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {  // 8 sign bits in one instruction
    for (; b < end && 8 * b + 8 <= n; ++b) bits[b] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_loadu_ps(x + 8 * b)));
  }
#endif
  for (; b < end; ++b) {
    uint8_t v = 0;
    for (int j = 0; j < 8; ++j) {
      const int64_t i = 8 * b + j;
      v |= static_cast<uint8_t>((i < n && std::signbit(static_cast<float>(x[i])) ? 1 : 0) << j);
    }
    bits[b] = v;
  }
}

torch::Tensor pack_signbits(const torch::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "pack_signbits: a contiguous tensor");
  const int64_t n = x.numel(), nb = (n + 7) / 8;
  auto bits = torch::empty({nb}, x.options().dtype(at::kByte));
  uint8_t* bp = bits.data_ptr<uint8_t>();
  IRC_DISPATCH(x.scalar_type(), "pack_signbits", {
    const scalar* xp = x.data_ptr<scalar>();
    at::parallel_for(0, nb, kGrain / 8, [=](int64_t begin, int64_t end) { signbit_range(xp, bp, n, begin, end); });
  });
  return bits;
}

template <typename T>
void unpack_range(const uint8_t* __restrict__ bits, const float* __restrict__ s, T* __restrict__ out, int64_t per_row,
                  int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    int64_t i = o * per_row;
    const int64_t stop = i + per_row;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>) {  // a row that starts on a byte: 8 floats a byte, s with its sign flipped
      if ((i & 7) == 0) {
        const __m256i shifts = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
        const __m256i sign = _mm256_set1_epi32(INT32_MIN);
        const __m256i plus = _mm256_castps_si256(_mm256_set1_ps(s[o]));
        for (; i + 8 <= stop; i += 8) {
          const __m256i flip = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(bits[i >> 3]), shifts), sign);
          _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_xor_si256(plus, flip)));
        }
      }
    }
#endif
    const T plus(s[o]), minus(-s[o]);
    for (; i < stop; ++i) out[i] = (bits[i >> 3] >> (i & 7)) & 1 ? minus : plus;
  }
}

// bits of a tensor of `shape` whose row o (of the first dimension) holds +-s[o] -> that tensor, in dtype
torch::Tensor unpack_signbits(const torch::Tensor& bits, const torch::Tensor& s, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  auto s_c = s.to(at::kFloat).contiguous();
  auto out = torch::empty(shape, bits.options().dtype(dtype));
  const int64_t rows = shape[0], per_row = rows ? out.numel() / rows : 0;
  TORCH_CHECK(bits.numel() * 8 >= out.numel() && s_c.numel() == rows, "unpack_signbits: bits or scales too short");
  const uint8_t* bp = bits.data_ptr<uint8_t>();
  const float* sp = s_c.data_ptr<float>();
  IRC_DISPATCH(dtype, "unpack_signbits", {
    scalar* op = out.data_ptr<scalar>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(per_row, 1)),
                     [=](int64_t begin, int64_t end) { unpack_range(bp, sp, op, per_row, begin, end); });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_forward", &sign_forward, "sign(x) in {-1, +1}, sign(0) = +1",
        py::call_guard<py::gil_scoped_release>());
  m.def("sign_backward", &sign_backward, "g times the surrogate derivative of sign at x (0 where clip and not -1 < x < 1)",
        py::call_guard<py::gil_scoped_release>());
  m.def("libra_forward", &libra_forward, "Libra-PB per output channel: (Q, mu, 1/std, s) of a float32 [out, fan-in] weight",
        py::call_guard<py::gil_scoped_release>());
  m.def("libra_backward", &libra_backward, "dL/dw of Libra-PB from w, dL/dQ, mu, 1/std, s and the sign's surrogate",
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_signbits", &pack_signbits, "sign bits of a contiguous tensor, 8 to a byte",
        py::call_guard<py::gil_scoped_release>());
  m.def("unpack_signbits", &unpack_signbits, "the tensor whose row o is +-s[o] by the sign bits",
        py::call_guard<py::gil_scoped_release>());
}
