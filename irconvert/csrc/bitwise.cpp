// Bitwise W1A1 conv2d and linear for irconvert.runtime: xor + popcount over 64-bit words.
//
// Bit j of word k is channel (or feature) 64k + j; bit 1 means -1, and sign(x) = -1 exactly when
// !(x >= 0), so NaN is -1 as in the float simulation. Bits past the channel count are 0 in both
// operands: they xor to 0 and need no mask. One output is dot = n * C - 2 * popcount(a xor w),
// times s = 2^exp, plus the bias: dot * 2^exp is exact in float32, so the output is rounded once
// (and is bit-identical to the float simulation when there is no bias).
//
// Layouts (irconvert/runtime/kernels.py writes the weights once at load; activations are packed
// here on every call):
//   conv weights     int64 [O][KH][KW][Wc], Wc = ceil(C_g / 64) words per kernel tap
//   conv activations uint64 [N][H][W][G][Wc]: the channels of one pixel and group along the words
//   linear weights   int64 [ceil(O / 8)][K][8], K = ceil(F / 64): word k of 8 output channels side
//                    by side; channels past O are zero words and never stored
//
// Conv: a work item gathers the bit patches of up to 64 output pixels of one image into a small
// buffer with the pixels side by side ([K][pixels], in L1, never a whole im2col), so that one
// 512-bit vector holds word k of 8 pixels. Each weight word is broadcast and xor/popcounted against
// it: the 8 lanes are 8 output pixels, which NCHW stores contiguously, so the epilogue is a vector
// store. Zero padding is a third value (0, not +-1) and must add nothing: n = the number of taps
// inside the image, and a padded tap, gathered as zero words, adds popcount(w_tap), which is taken
// back per lane (the zero-padding correction of Larq Compute Engine).
// Linear: the lanes are 8 output channels (batch 1 has one row), contiguous in the [N][O] output.
//
// Fused output transform (conv2d_ex, see irconvert/runtime/fuse.py for where it is exact): per
// output, with dot the integer accumulator,
//   y   = fma(dot, alpha_o, beta_o)      (a folded BatchNorm: alpha = s * g / sqrt(var + eps))
//         or dot * alpha_o + beta_o       (two roundings: the plain layer's s * dot + b)
//   y   = y + residual                    (optional, NCHW like the output)
//   y   = min(hi, max(lo, y))             (optional: Hardtanh / ReLU; NaN passes through as in torch)
// written as float NCHW and/or as packed sign bits [N][OH*OW][ceil(O / 64)] for the next binary
// layer, bit 1 = -1 where either !(y >= 0) or, without a float value, the per-channel integer
// threshold says so: dir_o > 0: dot < thr_o, dir_o < 0: dot > thr_o. The input may be packed bits
// already ([N][H][W][G * Wc] int64, what another layer wrote), so chained binary layers never see
// floats.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define IRC_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define IRC_AVX2 1
#endif

namespace {

constexpr int L = 8;    // 64-bit lanes of a vector: pixels (conv) or output channels (linear)
constexpr int MP = 4;   // rows per linear register tile
constexpr int MV = 4;   // channel blocks per linear register tile
constexpr int CV = 4;   // pixel vectors per conv register tile
constexpr int CO = 4;   // output channels per conv register tile
constexpr int64_t PBMAX = 64;  // output pixels per conv work item

const char* isa() {
#ifdef IRC_AVX512
  return "avx512-vpopcntdq";
#elif defined(IRC_AVX2)
  return "avx2";
#else
  return "popcnt64";
#endif
}

int threads() { return std::max(1, at::get_num_threads()); }

// Threads for `work` xor-popcounts of 64-bit words: below ~50 us of work a second thread costs more
// (fork/join, and waiting for a core that another process holds) than it saves.
int threads_for(int64_t work) { return work >= (int64_t{1} << 19) ? threads() : 1; }

// ---------------------------------------------------------------------------------------------
// conv2d

#if defined(IRC_AVX512) || defined(IRC_AVX2)
// fma on 8 floats: one rounding, as torch's BatchNorm computes x * alpha + beta.
inline __m256 fma8(__m256 a, __m256 b, __m256 c) {
#ifdef __FMA__
  return _mm256_fmadd_ps(a, b, c);
#else
  alignas(32) float x[8], y[8], z[8];
  _mm256_store_ps(x, a), _mm256_store_ps(y, b), _mm256_store_ps(z, c);
  for (int i = 0; i < 8; ++i) x[i] = std::fma(x[i], y[i], z[i]);
  return _mm256_load_ps(x);
#endif
}
#endif

// What one conv work item shares with its register tiles.
struct ConvBlock {
  const uint64_t* buf;    // gathered words [K][PB]: word k of pixel i at buf[k * PB + i]
  int64_t PB;             // lanes per word row, a multiple of 8
  int64_t np;             // pixels in use (<= PB)
  int64_t K, T;           // words per patch, kernel taps
  const int32_t* ncg;     // [PB] n_valid * C_g per pixel
  const int32_t* ncorr;   // [PB / 8] padded taps per pixel vector
  const int32_t* ctap;    // [PB / 8][T] those taps
  const uint8_t* cmask;   // [PB / 8][T] their lane masks (lanes whose tap is padding)
  const int32_t* wpop;    // [O][T] popcount of each weight tap
  const uint64_t* w;      // weight rows [O][K]
  const float* scale;     // alpha
  const float* bias;      // beta, or nullptr
  float* out;             // out + (n * O) * OHW + p0: channel o at out[o * OHW + i]; or nullptr
  int64_t OHW;
  bool fma;               // y = fma(dot, alpha, beta), else dot * alpha + beta
  const float* res;       // residual at the output's offset, or nullptr
  bool clamp;
  float lo, hi;
  uint64_t* bits;         // bits + (n * OHW + p0) * Wco: pixel i, channel o at bits[i * Wco + o / 64]; or nullptr
  int64_t Wco;
  const int32_t* thr;     // integer thresholds for the bits, or nullptr (bits from y)
  const int8_t* dir;
};

// y of one output from its integer dot, the transform of the file header.
inline float out_value(const ConvBlock& b, int64_t i, int64_t o, int64_t dot) {
  const float d = static_cast<float>(dot);
  float y = !b.bias ? d * b.scale[o] : b.fma ? std::fma(d, b.scale[o], b.bias[o]) : d * b.scale[o] + b.bias[o];
  if (b.res) y = y + b.res[o * b.OHW + i];
  if (b.clamp) y = y < b.lo ? b.lo : (y > b.hi ? b.hi : y);
  return y;
}

// Whether the packed output of one output is -1.
inline bool out_negative(const ConvBlock& b, int64_t o, int64_t dot, float y) {
  if (!b.thr) return !(y >= 0.f);
  return b.dir[o] > 0 ? dot < b.thr[o] : dot > b.thr[o];
}

// OR the sign bits of lanes [0, n) (bit i of neg[i]) into word o / 64 of pixels i0 + lane.
inline void put_bits(const ConvBlock& b, int64_t i0, int64_t n, int64_t o, const uint64_t* lane_bits) {
  uint64_t* w = b.bits + i0 * b.Wco + o / 64;
  for (int64_t l = 0; l < n; ++l) w[l * b.Wco] |= lane_bits[l];
}

// Output of lane i, channel o from its popcount: padded taps taken back, dot scaled, bias added.
inline void conv_store(const ConvBlock& b, int64_t i, int64_t o, int64_t ones) {
  const int64_t cv = (i / L) * b.T;
  for (int32_t j = 0; j < b.ncorr[i / L]; ++j)
    if (b.cmask[cv + j] >> (i % L) & 1) ones -= b.wpop[o * b.T + b.ctap[cv + j]];
  const int64_t dot = b.ncg[i] - 2 * ones;
  const bool need_y = b.out || (b.bits && !b.thr);
  const float y = need_y ? out_value(b, i, o, dot) : 0.f;
  if (b.out) b.out[o * b.OHW + i] = y;
  if (b.bits && out_negative(b, o, dot, y)) b.bits[i * b.Wco + o / 64] |= uint64_t{1} << (o % 64);
}

// Outputs of pixel vectors [v0, v0 + V) and channels [o0, o0 + Q) of a block.
template <int V, int Q>
inline void conv_tile(const ConvBlock& b, int64_t v0, int64_t o0) {
#ifdef IRC_AVX512
  __m512i acc[V][Q];
  for (int v = 0; v < V; ++v)
    for (int q = 0; q < Q; ++q) acc[v][q] = _mm512_setzero_si512();
  const uint64_t* a = b.buf + v0 * L;
  const uint64_t* w = b.w + o0 * b.K;
  for (int64_t k = 0; k < b.K; ++k) {
    __m512i av[V];
    for (int v = 0; v < V; ++v) av[v] = _mm512_loadu_si512(a + k * b.PB + v * L);
    for (int q = 0; q < Q; ++q) {
      const __m512i wv = _mm512_set1_epi64(static_cast<int64_t>(w[q * b.K + k]));
      for (int v = 0; v < V; ++v)
        acc[v][q] = _mm512_add_epi64(acc[v][q], _mm512_popcnt_epi64(_mm512_xor_si512(av[v], wv)));
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t i0 = (v0 + v) * L;
    const __m512i ncg = _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ncg + i0)));
    const int64_t left = b.np - i0;
    const __mmask8 store = left >= L ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << left) - 1);
    __m512i nbits = _mm512_setzero_si512();
    for (int q = 0; q < Q; ++q) {
      const int64_t o = o0 + q;
      __m512i ones = acc[v][q];
      const int64_t cv = (v0 + v) * b.T;
      for (int32_t j = 0; j < b.ncorr[v0 + v]; ++j)
        ones = _mm512_mask_sub_epi64(ones, b.cmask[cv + j], ones, _mm512_set1_epi64(b.wpop[o * b.T + b.ctap[cv + j]]));
      const __m256i dot = _mm512_cvtepi64_epi32(_mm512_sub_epi64(ncg, _mm512_slli_epi64(ones, 1)));
      __m256 y = _mm256_setzero_ps();
      if (b.out || (b.bits && !b.thr)) {
        const __m256 a = _mm256_set1_ps(b.scale[o]);
        y = _mm256_cvtepi32_ps(dot);
        if (!b.bias) y = _mm256_mul_ps(y, a);
        else if (b.fma) y = fma8(y, a, _mm256_set1_ps(b.bias[o]));
        else y = _mm256_add_ps(_mm256_mul_ps(y, a), _mm256_set1_ps(b.bias[o]));
        if (b.res) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(store, b.res + o * b.OHW + i0));
        // max_ps / min_ps return their second operand on NaN: NaN passes through, as torch's clamp
        if (b.clamp) y = _mm256_min_ps(_mm256_set1_ps(b.hi), _mm256_max_ps(_mm256_set1_ps(b.lo), y));
      }
      if (b.out) _mm256_mask_storeu_ps(b.out + o * b.OHW + i0, store, y);
      if (b.bits) {
        __mmask8 neg;
        if (!b.thr) neg = _mm256_cmp_ps_mask(y, _mm256_setzero_ps(), _CMP_NGE_UQ);
        else if (b.dir[o] > 0) neg = _mm256_cmplt_epi32_mask(dot, _mm256_set1_epi32(b.thr[o]));
        else neg = _mm256_cmpgt_epi32_mask(dot, _mm256_set1_epi32(b.thr[o]));
        nbits = _mm512_mask_or_epi64(nbits, neg, nbits, _mm512_set1_epi64(static_cast<int64_t>(uint64_t{1} << (o % 64))));
      }
    }
    if (b.bits) {
      alignas(64) uint64_t lane_bits[L];
      _mm512_store_si512(lane_bits, nbits);
      put_bits(b, i0, std::min<int64_t>(L, left), o0, lane_bits);
    }
  }
#elif defined(IRC_AVX2)
  // Popcount by nibble lookup (Mula, Kurz, Lemire, "Faster population counts using AVX2
  // instructions"): byte counts (<= 8 a word) add up in bytes for 31 words, then vpsadbw sums
  // the 8 bytes of each 64-bit lane, i.e. of each pixel.
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  for (int v = 0; v < V; ++v) {
    __m256i acc[2][Q];
    for (int h = 0; h < 2; ++h)
      for (int q = 0; q < Q; ++q) acc[h][q] = zero;
    const uint64_t* a = b.buf + (v0 + v) * L;
    for (int64_t k0 = 0; k0 < b.K; k0 += 31) {
      __m256i cnt[2][Q];
      for (int h = 0; h < 2; ++h)
        for (int q = 0; q < Q; ++q) cnt[h][q] = zero;
      for (int64_t k = k0; k < std::min(b.K, k0 + 31); ++k) {
        const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k * b.PB));
        const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k * b.PB + 4));
        for (int q = 0; q < Q; ++q) {
          const __m256i wv = _mm256_set1_epi64x(static_cast<int64_t>(b.w[(o0 + q) * b.K + k]));
          const __m256i x0 = _mm256_xor_si256(a0, wv), x1 = _mm256_xor_si256(a1, wv);
          cnt[0][q] = _mm256_add_epi8(cnt[0][q], _mm256_add_epi8(
              _mm256_shuffle_epi8(lut, _mm256_and_si256(x0, low4)),
              _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), low4))));
          cnt[1][q] = _mm256_add_epi8(cnt[1][q], _mm256_add_epi8(
              _mm256_shuffle_epi8(lut, _mm256_and_si256(x1, low4)),
              _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), low4))));
        }
      }
      for (int h = 0; h < 2; ++h)
        for (int q = 0; q < Q; ++q) acc[h][q] = _mm256_add_epi64(acc[h][q], _mm256_sad_epu8(cnt[h][q], zero));
    }
    const int64_t i0 = (v0 + v) * L, cv = (v0 + v) * b.T;
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6), lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i ncg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ncg + i0));
    const __m256i store = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(b.np - i0)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    uint64_t lane_bits[L] = {};
    for (int q = 0; q < Q; ++q) {
      const int64_t o = o0 + q;
      // counts are < 2^31: the low halves of the 64-bit lanes, 8 pixels in one vector of int32
      __m256i ones = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(acc[0][q], even),
                                        _mm256_permutevar8x32_epi32(acc[1][q], even), 0xF0);
      for (int32_t j = 0; j < b.ncorr[v0 + v]; ++j) {
        const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b.cmask[cv + j]), lane), lane);
        ones = _mm256_sub_epi32(ones, _mm256_and_si256(m, _mm256_set1_epi32(b.wpop[o * b.T + b.ctap[cv + j]])));
      }
      const __m256i dot = _mm256_sub_epi32(ncg, _mm256_slli_epi32(ones, 1));
      __m256 y = _mm256_setzero_ps();
      if (b.out || (b.bits && !b.thr)) {
        const __m256 a = _mm256_set1_ps(b.scale[o]);
        y = _mm256_cvtepi32_ps(dot);
        if (!b.bias) y = _mm256_mul_ps(y, a);
        else if (b.fma) y = fma8(y, a, _mm256_set1_ps(b.bias[o]));
        else y = _mm256_add_ps(_mm256_mul_ps(y, a), _mm256_set1_ps(b.bias[o]));
        if (b.res) y = _mm256_add_ps(y, _mm256_maskload_ps(b.res + o * b.OHW + i0, store));
        if (b.clamp) y = _mm256_min_ps(_mm256_set1_ps(b.hi), _mm256_max_ps(_mm256_set1_ps(b.lo), y));
      }
      if (b.out) _mm256_maskstore_ps(b.out + o * b.OHW + i0, store, y);
      if (b.bits) {
        __m256i m;
        if (!b.thr) m = _mm256_castps_si256(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_NGE_UQ));
        else if (b.dir[o] > 0) m = _mm256_cmpgt_epi32(_mm256_set1_epi32(b.thr[o]), dot);
        else m = _mm256_cmpgt_epi32(dot, _mm256_set1_epi32(b.thr[o]));
        const int neg = _mm256_movemask_ps(_mm256_castsi256_ps(m));
        for (int l = 0; l < L; ++l) lane_bits[l] |= static_cast<uint64_t>(neg >> l & 1) << (o % 64);
      }
    }
    if (b.bits) put_bits(b, i0, std::min<int64_t>(L, b.np - i0), o0, lane_bits);
  }
#else
  // Two pixels at a time against Q channels: the 2 x Q counts stay in registers.
  const int64_t i_end = std::min(b.np, (v0 + V) * L);
  for (int64_t i = v0 * L; i < i_end; i += 2) {
    int64_t ones[2][Q] = {};
    for (int64_t k = 0; k < b.K; ++k) {
      const uint64_t a0 = b.buf[k * b.PB + i], a1 = b.buf[k * b.PB + i + 1];
      for (int q = 0; q < Q; ++q) {
        const uint64_t wv = b.w[(o0 + q) * b.K + k];
        ones[0][q] += __builtin_popcountll(a0 ^ wv);
        ones[1][q] += __builtin_popcountll(a1 ^ wv);
      }
    }
    for (int r = 0; r < 2 && i + r < i_end; ++r)
      for (int q = 0; q < Q; ++q) conv_store(b, i + r, o0 + q, ones[r][q]);
  }
#endif
}

template <int V>
inline void conv_tile_q(int q, const ConvBlock& b, int64_t v0, int64_t o0) {
  switch (q) {
    case 4: conv_tile<V, 4>(b, v0, o0); break;
    case 3: conv_tile<V, 3>(b, v0, o0); break;
    case 2: conv_tile<V, 2>(b, v0, o0); break;
    default: conv_tile<V, 1>(b, v0, o0); break;
  }
}

// All outputs of a block for channels [o_lo, o_hi), in CV x CO register tiles.
void conv_block(const ConvBlock& b, int64_t o_lo, int64_t o_hi) {
  const int64_t nv = (b.np + L - 1) / L;
  for (int64_t v = 0; v < nv; v += CV) {
    const int pv = static_cast<int>(std::min<int64_t>(CV, nv - v));
    for (int64_t o = o_lo; o < o_hi; o += CO) {
      const int q = static_cast<int>(std::min<int64_t>(CO, o_hi - o));
      switch (pv) {
        case 4: conv_tile_q<4>(q, b, v, o); break;
        case 3: conv_tile_q<3>(q, b, v, o); break;
        case 2: conv_tile_q<2>(q, b, v, o); break;
        default: conv_tile_q<1>(q, b, v, o); break;
      }
    }
  }
}

// Sign bits of NCHW float x into [N][HW][G][Wc] words.
void pack_nchw(const float* x, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t Wc, uint64_t* out) {
  const int64_t Cg = C / G;
  constexpr int64_t CHUNK = 256;  // pixels per pass: the partial words stay in L1
  const int64_t chunks = (HW + CHUNK - 1) / CHUNK;
  const int64_t items = N * G * Wc * chunks;
#pragma omp parallel for num_threads(threads()) schedule(static) if (items > 1 && N * C * HW > 65536)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t ch = it % chunks, k = (it / chunks) % Wc, g = (it / chunks / Wc) % G, n = it / chunks / Wc / G;
    const int64_t p0 = ch * CHUNK, np = std::min(CHUNK, HW - p0);
    const int64_t c0 = g * Cg + k * 64, nc = std::min<int64_t>(64, Cg - k * 64);
    uint64_t word[CHUNK] = {};
    for (int64_t j = 0; j < nc; ++j) {
      const float* xc = x + ((n * C + c0 + j) * HW) + p0;
      for (int64_t i = 0; i < np; ++i) word[i] |= static_cast<uint64_t>(!(xc[i] >= 0.f)) << j;
    }
    uint64_t* o = out + ((n * HW + p0) * G + g) * Wc + k;
    for (int64_t i = 0; i < np; ++i) o[i * G * Wc] = word[i];
  }
}

// Gather the bit patches of pixels [p0, p0 + np) of one image into b's buffer, with the counts
// and padding masks the epilogue's zero-padding correction needs.
void gather(ConvBlock& b, const uint64_t* an, uint8_t* padm, int64_t p0, int64_t np, int64_t H, int64_t W, int64_t OW,
            int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw, int64_t G,
            int64_t Wc, int64_t Cg) {
  const int64_t PBL = b.PB, T = b.T, K = b.K;
  uint64_t* buf = const_cast<uint64_t*>(b.buf);
  int32_t* ncg = const_cast<int32_t*>(b.ncg);
  std::fill(padm, padm + T * PBL / L, 0);
  std::fill(ncg, ncg + PBL, 0);
  for (int64_t i = 0; i < np; ++i) {
    const int64_t oh = (p0 + i) / OW, ow = (p0 + i) % OW;
    int64_t valid = 0;
    for (int64_t kh = 0; kh < KH; ++kh) {
      const int64_t ih = oh * sh - pt + kh * dh;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t iw = ow * sw - pl + kw * dw, t = kh * KW + kw;
        uint64_t* dst = buf + t * Wc * PBL + i;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
          const uint64_t* src = an + (ih * W + iw) * G * Wc;
          for (int64_t c = 0; c < Wc; ++c) dst[c * PBL] = src[c];
          ++valid;
        } else {
          for (int64_t c = 0; c < Wc; ++c) dst[c * PBL] = 0;
          padm[t * (PBL / L) + i / L] |= static_cast<uint8_t>(1u << (i % L));
        }
      }
    }
    ncg[i] = static_cast<int32_t>(valid * Cg);
  }
  for (int64_t i = np; i < PBL; ++i)  // lanes past the block: computed, never stored
    for (int64_t k = 0; k < K; ++k) buf[k * PBL + i] = 0;
  int32_t* ncorr = const_cast<int32_t*>(b.ncorr);
  int32_t* ctap = const_cast<int32_t*>(b.ctap);
  uint8_t* cmask = const_cast<uint8_t*>(b.cmask);
  for (int64_t v = 0; v < PBL / L; ++v) {
    int32_t c = 0;
    for (int64_t t = 0; t < T; ++t)
      if (padm[t * (PBL / L) + v]) {
        ctap[v * T + c] = static_cast<int32_t>(t);
        cmask[v * T + c++] = padm[t * (PBL / L) + v];
      }
    ncorr[v] = c;
  }
}

void check_weights(const torch::Tensor& w, const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt64 && w.is_contiguous(),
              "bitwise: weight words must be a contiguous int64 CPU tensor");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(), "bitwise: scale must be float32");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == scale.numel(),
                "bitwise: bias must be float32 [out]");
}

void check_common(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                  const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "bitwise: input must be a contiguous float32 CPU tensor");
  check_weights(w, scale, bias);
}

// sign bits of float NCHW x as int64 [N][H][W][G * Wc] (the packed input of conv2d_ex).
torch::Tensor pack(torch::Tensor x, int64_t G) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 4,
              "bitwise pack: input must be a contiguous float32 CPU tensor [N,C,H,W]");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(G >= 1 && C % G == 0, "bitwise pack: channels do not fit groups");
  const int64_t Wc = (C / G + 63) / 64;
  auto out = torch::empty({N, H, W, G * Wc}, x.options().dtype(torch::kInt64));
  if (out.numel()) pack_nchw(x.data_ptr<float>(), N, C, H * W, G, Wc, reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()));
  return out;
}

// The conv with the fused output transform of the file header. x: float NCHW, or int64 packed
// [N][H][W][G * Wc] sign bits (then C says the channel count). Returns {float NCHW output or an
// empty tensor, packed bits [N][OH][OW][ceil(O / 64)] or an empty tensor}.
std::vector<torch::Tensor> conv2d_ex(torch::Tensor x, int64_t C, torch::Tensor w, torch::Tensor alpha,
                                     c10::optional<torch::Tensor> beta, bool fma, c10::optional<torch::Tensor> res,
                                     bool clamp, double lo, double hi, bool want_float, bool want_bits,
                                     c10::optional<torch::Tensor> thr, c10::optional<torch::Tensor> dir,
                                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                                     int64_t OH, int64_t OW, int64_t G) {
  const bool packed = x.scalar_type() == torch::kInt64;
  if (!packed) check_common(x, w, alpha, beta);
  else check_weights(w, alpha, beta);
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 4 && w.dim() == 4,
              "bitwise conv2d: input [N,C,H,W] floats or [N,H,W,words] bits, weight words [O,KH,KW,Wc]");
  const int64_t N = x.size(0), H = packed ? x.size(1) : x.size(2), W = packed ? x.size(2) : x.size(3);
  if (!packed) C = x.size(1);
  const int64_t O = w.size(0), KH = w.size(1), KW = w.size(2), Wc = w.size(3);
  TORCH_CHECK(G >= 1 && C % G == 0 && O % G == 0 && alpha.numel() == O, "bitwise conv2d: channels do not fit groups");
  const int64_t Cg = C / G, Og = O / G, T = KH * KW, K = T * Wc, HW = H * W, OHW = OH * OW, Wco = (O + 63) / 64;
  TORCH_CHECK(Wc == (Cg + 63) / 64 && (!packed || x.size(3) == G * Wc),
              "bitwise conv2d: weight words do not fit the input channels");
  TORCH_CHECK(!want_bits || G == 1, "bitwise conv2d: packed output needs groups=1");
  if (res.has_value())
    TORCH_CHECK(res->scalar_type() == torch::kFloat32 && res->is_contiguous() && res->dim() == 4 && res->size(0) == N &&
                res->size(1) == O && res->size(2) == OH && res->size(3) == OW, "bitwise conv2d: residual must be [N,O,OH,OW] float32");
  if (thr.has_value())
    TORCH_CHECK(thr->scalar_type() == torch::kInt32 && thr->numel() == O && dir.has_value() &&
                dir->scalar_type() == torch::kInt8 && dir->numel() == O, "bitwise conv2d: thresholds int32 [O], dir int8 [O]");
  auto out = want_float ? torch::empty({N, O, OH, OW}, w.options().dtype(torch::kFloat32)) : torch::empty({0});
  auto bits = torch::empty({want_bits ? N : 0, OH, OW, Wco}, w.options());
  // zeroed here, not by torch::zeros, whose parallel fill costs more than this small memset
  if (want_bits) std::memset(bits.data_ptr<int64_t>(), 0, static_cast<size_t>(bits.numel()) * sizeof(int64_t));
  if (N * O * OHW == 0) return {out, bits};

  std::vector<uint64_t> own;
  const uint64_t* act;
  if (packed) {
    act = reinterpret_cast<const uint64_t*>(x.data_ptr<int64_t>());
  } else {
    own.resize(static_cast<size_t>(N * HW * G * Wc));
    pack_nchw(x.data_ptr<float>(), N, C, HW, G, Wc, own.data());
    act = own.data();
  }
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>());
  std::vector<int32_t> wpop(static_cast<size_t>(O * T));
  for (int64_t i = 0; i < O * T; ++i) {
    int32_t c = 0;
    for (int64_t k = 0; k < Wc; ++k) c += __builtin_popcountll(wp[i * Wc + k]);
    wpop[i] = c;
  }

  // Work item = (image, group, block of output pixels, block of output channels); blocks shrink
  // until there is work for every thread. Packed output keeps 64-channel blocks, so that no two
  // threads write one word.
  const int nt = threads_for(N * OHW * O * K);
  const int64_t OBMIN = want_bits ? 64 : 16;
  int64_t PB = PBMAX, OB = 64;
  auto count = [&](int64_t pb, int64_t ob) { return N * G * ((OHW + pb - 1) / pb) * ((Og + ob - 1) / ob); };
  while (count(PB, OB) < 2 * nt && (PB > 16 || OB > OBMIN)) {
    if (PB > 16) PB /= 2; else OB /= 2;
  }
  const int64_t pblocks = (OHW + PB - 1) / PB, oblocks = (Og + OB - 1) / OB, items = count(PB, OB);
  const float* sp = alpha.data_ptr<float>();
  const float* bp = beta.has_value() ? beta->data_ptr<float>() : nullptr;
  const float* rp = res.has_value() ? res->data_ptr<float>() : nullptr;
  float* yp = want_float ? out.data_ptr<float>() : nullptr;
  uint64_t* bitp = want_bits ? reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()) : nullptr;
  const int32_t* tp = thr.has_value() ? thr->data_ptr<int32_t>() : nullptr;
  const int8_t* dp = dir.has_value() ? dir->data_ptr<int8_t>() : nullptr;

#pragma omp parallel num_threads(nt) if (items > 1 && nt > 1)
  {
    const int64_t PBL = (PB + L - 1) / L * L;
    std::vector<uint64_t> buf(static_cast<size_t>(K * PBL));
    std::vector<int32_t> ncg(static_cast<size_t>(PBL));
    std::vector<uint8_t> padm(static_cast<size_t>(T * PBL / L));
    std::vector<int32_t> ncorr(static_cast<size_t>(PBL / L)), ctap(static_cast<size_t>(T * PBL / L));
    std::vector<uint8_t> cmask(static_cast<size_t>(T * PBL / L));
    ConvBlock b{buf.data(), PBL, 0, K, T, ncg.data(), ncorr.data(), ctap.data(), cmask.data(), wpop.data(), wp, sp, bp,
                nullptr, OHW, fma, nullptr, clamp, static_cast<float>(lo), static_cast<float>(hi), nullptr, Wco, tp, dp};
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t ob = it % oblocks, pb = (it / oblocks) % pblocks, g = (it / oblocks / pblocks) % G;
      const int64_t n = it / oblocks / pblocks / G;
      const int64_t p0 = pb * PB, np = std::min(PB, OHW - p0);
      gather(b, act + n * HW * G * Wc + g * Wc, padm.data(), p0, np, H, W, OW, KH, KW, sh, sw, pt, pl, dh, dw, G, Wc, Cg);
      b.np = np;
      b.out = yp ? yp + n * O * OHW + p0 : nullptr;
      b.res = rp ? rp + n * O * OHW + p0 : nullptr;
      b.bits = bitp ? bitp + (n * OHW + p0) * Wco : nullptr;
      conv_block(b, g * Og + ob * OB, std::min(g * Og + Og, g * Og + (ob + 1) * OB));
    }
  }
  return {out, bits};
}

// y[n][o][oh][ow] = s_o * (n_valid * C_g - 2 * popcount(patch xor w_o)) + b_o.
torch::Tensor conv2d(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw, int64_t OH, int64_t OW,
                     int64_t G) {
  return conv2d_ex(x, 0, w, scale, bias, false, c10::nullopt, false, 0., 0., true, false, c10::nullopt, c10::nullopt,
                   sh, sw, pt, pl, dh, dw, OH, OW, G)[0];
}

// ---------------------------------------------------------------------------------------------
// linear

// pop[p][v * L + j] = sum_k popcount(a[p][k] xor w[v][k][j]) for P rows and V blocks (of stride K * L).
template <int P, int V>
inline void lin_tile(const uint64_t* const* a, const uint64_t* w, int64_t K, int32_t* pop, int64_t pop_stride) {
#ifdef IRC_AVX512
  __m512i acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; ++k) {
    __m512i wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(w + (v * K + k) * L);
    for (int p = 0; p < P; ++p) {
      const __m512i av = _mm512_set1_epi64(static_cast<int64_t>(a[p][k]));
      for (int v = 0; v < V; ++v)
        acc[p][v] = _mm512_add_epi64(acc[p][v], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[v])));
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pop + p * pop_stride + v * L), _mm512_cvtepi64_epi32(acc[p][v]));
#else
  uint32_t acc[P][V * L] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int p = 0; p < P; ++p) {
      const uint64_t av = a[p][k];
      for (int v = 0; v < V; ++v)
        for (int j = 0; j < L; ++j) acc[p][v * L + j] += __builtin_popcountll(av ^ w[(v * K + k) * L + j]);
    }
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < V * L; ++i) pop[p * pop_stride + i] = static_cast<int32_t>(acc[p][i]);
#endif
}

template <int P>
inline void lin_tile_v(int v, const uint64_t* const* a, const uint64_t* w, int64_t K, int32_t* pop, int64_t ps) {
  switch (v) {
    case 4: lin_tile<P, 4>(a, w, K, pop, ps); break;
    case 3: lin_tile<P, 3>(a, w, K, pop, ps); break;
    case 2: lin_tile<P, 2>(a, w, K, pop, ps); break;
    default: lin_tile<P, 1>(a, w, K, pop, ps); break;
  }
}

// pop[r][0 : nblk * L] for rows[0 : nrows] against nblk consecutive weight blocks.
void lin_block(const uint64_t* const* rows, int64_t nrows, const uint64_t* w, int64_t nblk, int64_t K, int32_t* pop,
               int64_t ps) {
  for (int64_t r = 0; r < nrows; r += MP) {
    const int p = static_cast<int>(std::min<int64_t>(MP, nrows - r));
    for (int64_t b = 0; b < nblk; b += MV) {
      const int v = static_cast<int>(std::min<int64_t>(MV, nblk - b));
      const uint64_t* const* a = rows + r;
      const uint64_t* wb = w + b * K * L;
      int32_t* pb = pop + r * ps + b * L;
      switch (p) {
        case 4: lin_tile_v<4>(v, a, wb, K, pb, ps); break;
        case 3: lin_tile_v<3>(v, a, wb, K, pb, ps); break;
        case 2: lin_tile_v<2>(v, a, wb, K, pb, ps); break;
        default: lin_tile_v<1>(v, a, wb, K, pb, ps); break;
      }
    }
  }
}

// Sign bits of row-major float x [N][F] into [N][K] words.
void pack_rows(const float* x, int64_t N, int64_t F, int64_t K, uint64_t* out) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float* xr = x + n * F + k * 64;
      const int64_t nc = std::min<int64_t>(64, F - k * 64);
      uint64_t word = 0;
      for (int64_t j = 0; j < nc; ++j) word |= static_cast<uint64_t>(!(xr[j] >= 0.f)) << j;
      out[n * K + k] = word;
    }
}

// y[n][o] = s_o * (F - 2 * popcount(x_n xor w_o)) + b_o.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                     int64_t F) {
  check_common(x, w, scale, bias);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == L && x.size(1) == F,
              "bitwise linear: input [N,F], weight words [blocks,K,8]");
  const int64_t N = x.size(0), O = scale.numel(), K = (F + 63) / 64, B = (O + L - 1) / L;
  TORCH_CHECK(w.size(0) == B && w.size(1) == K, "bitwise linear: weight words do not fit in_features and scale");
  auto out = torch::empty({N, O}, x.options());
  if (out.numel() == 0) return out;
  std::vector<uint64_t> act(static_cast<size_t>(N * K));
  pack_rows(x.data_ptr<float>(), N, F, K, act.data());
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>());
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();

  // Work item = (block of up to 16 rows, 4 weight blocks = 32 channels): the weights, the large
  // operand, are read once per row block.
  const int nt = threads_for(N * O * K);
  constexpr int64_t RB = 16, OBB = 4;
  const int64_t oblocks = (B + OBB - 1) / OBB, rblocks = (N + RB - 1) / RB, items = oblocks * rblocks;
#pragma omp parallel for num_threads(nt) schedule(static) if (items > 1 && nt > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t ob = it % oblocks, r0 = (it / oblocks) * RB, nr = std::min(RB, N - r0);
    const int64_t nb = std::min(OBB, B - ob * OBB), o0 = ob * OBB * L, no = std::min(nb * L, O - o0);
    const uint64_t* rows[RB];
    for (int64_t r = 0; r < nr; ++r) rows[r] = act.data() + (r0 + r) * K;
    int32_t pop[RB * OBB * L];
    lin_block(rows, nr, wp + ob * OBB * K * L, nb, K, pop, OBB * L);
    for (int64_t r = 0; r < nr; ++r) {
      float* y = yp + (r0 + r) * O + o0;
      for (int64_t c = 0; c < no; ++c) {
        const float v = static_cast<float>(F - 2 * pop[r * OBB * L + c]) * sp[o0 + c];
        y[c] = bp ? v + bp[o0 + c] : v;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// BatchNorm + clamp + max-pool (a ResNet stem): y = maxpool(clamp(fma(x, alpha_c, beta_c), lo, hi)),
// in one pass per channel plane; padding is -inf, NaN propagates as in torch's max-pool.

// max that keeps a NaN (either operand), as a select the compiler vectorizes
inline float nanmax(float m, float v) { return ((v > m) | (v != v)) ? v : m; }

torch::Tensor affine_maxpool(torch::Tensor x, torch::Tensor alpha, torch::Tensor beta, bool clamp, double lo, double hi,
                             int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t OH,
                             int64_t OW) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 4,
              "bitwise affine_maxpool: input must be a contiguous float32 CPU tensor [N,C,H,W]");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(alpha.numel() == C && beta.numel() == C && alpha.scalar_type() == torch::kFloat32 &&
              beta.scalar_type() == torch::kFloat32, "bitwise affine_maxpool: alpha, beta float32 [C]");
  auto out = torch::empty({N, C, OH, OW}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ap = alpha.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi), ninf = -std::numeric_limits<float>::infinity();
  const int64_t WP = (OW - 1) * SW + KW;  // the padded row a window slides over
  const int nt = N * C * H * W >= (int64_t{1} << 16) ? threads() : 1;
#pragma omp parallel num_threads(nt) if (nt > 1 && N * C > 1)
  {
    std::vector<float> t(static_cast<size_t>(H * W)), m(static_cast<size_t>(std::max(WP, PW + W))), hm(static_cast<size_t>(OW * SW + KW));
#pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; ++nc) {
      const float a = ap[nc % C], b = bp[nc % C];
      const float* src = xp + nc * H * W;
      float* tp = t.data();
      if (clamp) {
        for (int64_t i = 0; i < H * W; ++i) {
          const float v = std::fma(src[i], a, b);
          tp[i] = v < flo ? flo : (v > fhi ? fhi : v);
        }
      } else {
        for (int64_t i = 0; i < H * W; ++i) tp[i] = std::fma(src[i], a, b);
      }
      float* dst = yp + nc * OH * OW;
      float* mp = m.data();
      float* hp = hm.data();
      const int64_t mlen = static_cast<int64_t>(m.size());
      for (int64_t oh = 0; oh < OH; ++oh) {
        const int64_t h0 = std::max<int64_t>(0, oh * SH - PH), h1 = std::min<int64_t>(H, oh * SH - PH + KH);
        for (int64_t j = 0; j < mlen; ++j) mp[j] = ninf;
        for (int64_t ih = h0; ih < h1; ++ih) {
          const float* row = tp + ih * W;
          float* mr = mp + PW;  // column iw sits at PW + iw: the left padding is -inf
          for (int64_t iw = 0; iw < W; ++iw) mr[iw] = nanmax(mr[iw], row[iw]);
        }
        const int64_t span = (OW - 1) * SW + 1;
        for (int64_t j = 0; j < span; ++j) hp[j] = mp[j];
        for (int64_t d = 1; d < KW; ++d)
          for (int64_t j = 0; j < span; ++j) hp[j] = nanmax(hp[j], j + d < mlen ? mp[j + d] : ninf);
        for (int64_t ow = 0; ow < OW; ++ow) dst[oh * OW + ow] = hp[ow * SW];
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "irconvert bitwise W1A1 kernels (xor + popcount over 64-bit words)";
  m.def("conv2d", &conv2d, "bitwise W1A1 conv2d", py::call_guard<py::gil_scoped_release>());
  m.def("conv2d_ex", &conv2d_ex, "bitwise W1A1 conv2d with the fused output transform",
        py::call_guard<py::gil_scoped_release>());
  m.def("affine_maxpool", &affine_maxpool, "max-pool of clamp(fma(x, alpha, beta))",
        py::call_guard<py::gil_scoped_release>());
  m.def("pack", &pack, "sign bits of a float NCHW tensor", py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "bitwise W1A1 linear", py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "instruction set the kernels were compiled for");
}
