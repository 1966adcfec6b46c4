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
#include <cstring>
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

// Each range is a plain function of restrict pointers and by-value scalars: inside a lambda that
// captures by reference, the compiler must assume a store to y may change x, t or k, and does not vectorize.
template <typename T>
void sign_range(const T* __restrict__ x, T* __restrict__ y, int64_t begin, int64_t end) {
  const T plus(1.0f), minus(-1.0f);
  for (int64_t i = begin; i < end; ++i) y[i] = static_cast<float>(x[i]) >= 0.0f ? plus : minus;
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
    const float e = exp_nonpositive(-2.0f * __builtin_fabsf(t * xf));
    const float q = 1.0f + e;
    out[i] = static_cast<T>(clipped<Clip>(xf, static_cast<float>(g[i]) * (kt4 * e / (q * q))));
  }
}

template <typename T, bool Clip>
void ste_range(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float xf = static_cast<float>(x[i]);
    out[i] = static_cast<T>(clipped<Clip>(xf, static_cast<float>(g[i]) * (__builtin_fabsf(xf) <= 1.0f ? 1.0f : 0.0f)));
  }
}

template <typename T, bool Clip>
void approx_range(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float xf = static_cast<float>(x[i]);
    const float d = 2.0f - 2.0f * __builtin_fabsf(xf);
    out[i] = static_cast<T>(clipped<Clip>(xf, static_cast<float>(g[i]) * (d < 0.0f ? 0.0f : d)));  // NaN stays NaN, as clamp
  }
}

template <typename T>
void sign_loop(const T* x, T* y, int64_t n) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) { sign_range(x, y, begin, end); });
}

template <typename T, bool Clip>
void grad_loop(const T* g, const T* x, T* out, int64_t n, int mode, float t, float k) {
  const float kt4 = 4.0f * k * t;
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    if (mode == 0) ede_range<T, Clip>(g, x, out, begin, end, t, kt4);
    else if (mode == 1) ste_range<T, Clip>(g, x, out, begin, end);
    else approx_range<T, Clip>(g, x, out, begin, end);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_forward", &sign_forward, "sign(x) in {-1, +1}, sign(0) = +1",
        py::call_guard<py::gil_scoped_release>());
  m.def("sign_backward", &sign_backward, "g times the surrogate derivative of sign at x (0 where clip and not -1 < x < 1)",
        py::call_guard<py::gil_scoped_release>());
}
