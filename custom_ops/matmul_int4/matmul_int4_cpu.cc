// redrafter::MatMulInt4 on the CPU (semantics: matmul_int4.h). Two code paths with bit-identical
// results: AVX-512 VNNI (vpdpbusd multiplies 4 unsigned codes by 4 signed activation bytes per
// lane) where the CPU has it, and a portable loop elsewhere. Only the integer sums are
// vectorised differently; the float steps are the same operations in the same order.
#include "matmul_int4.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12's _mm512_cvtepi32_ps passes _mm512_undefined_ps() as its unused merge source, which
// -Wmaybe-uninitialized reports in every instantiation: a false positive of the header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace redrafter {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles in group g (the last group may hold fewer than kGroup).
int64_t group_tiles(const PackedInt4& w, int64_t g) {
  return std::min(kGroup, w.tiles - g * kGroup);
}

// The activation, quantized per row and 32-wide sub-block (matmul_int4.h).
struct QuantizedRows {
  int64_t M = 0, KS = 0;
  std::vector<int8_t> q;      // [M][KS * 32], zero past K
  std::vector<float> scale;   // [M][KS]
  std::vector<int32_t> sum;   // [M][KS]  sum of q over the sub-block (for the zero points)
};

QuantizedRows quantize_rows(const float* A, int64_t M, int64_t K, int64_t KS) {
  QuantizedRows r;
  r.M = M;
  r.KS = KS;
  r.q.assign(static_cast<size_t>(M * KS * kSubBlock), 0);
  r.scale.assign(static_cast<size_t>(M * KS), 0.0f);
  r.sum.assign(static_cast<size_t>(M * KS), 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    for (int64_t j = 0; j < KS; ++j) {
      const int64_t k0 = j * kSubBlock, k1 = std::min(K, k0 + kSubBlock);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(a[k]));
      if (amax == 0.0f) continue;  // an all-zero sub-block adds exactly nothing
      const float inv = 127.0f / amax;
      int8_t* q = &r.q[static_cast<size_t>(m * KS * kSubBlock + k0)];
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(a[k] * inv));
        q[k - k0] = static_cast<int8_t>(std::clamp(v, -127, 127));
        sum += q[k - k0];
      }
      r.scale[static_cast<size_t>(m * KS + j)] = amax / 127.0f;
      r.sum[static_cast<size_t>(m * KS + j)] = sum;
    }
  }
  return r;
}

// Offsets of a group's data in the packed arrays (all earlier groups are full).
size_t codes_offset(const PackedInt4& w, int64_t g) {
  return static_cast<size_t>(g * kGroup * w.KS * 256);
}
size_t scales_offset(const PackedInt4& w, int64_t g) {
  return static_cast<size_t>(g * kGroup * w.KB * kTile);
}

// ---- the portable loop -------------------------------------------------------------------------

void group_portable(const PackedInt4& w, const QuantizedRows& a, int64_t g, float* Y) {
  const int64_t nt = group_tiles(w, g);
  const uint8_t* codes = w.codes.data() + codes_offset(w, g);
  const float* scales = w.scales.data() + scales_offset(w, g);
  const uint8_t* zeros = w.symmetric ? nullptr : w.zeros.data() + scales_offset(w, g);
  const int64_t sub_per_block = w.block_size / kSubBlock;
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t col = 0; col < kTile; ++col) {
      const int64_t n = (g * kGroup + t) * kTile + col;
      if (n >= w.N) break;
      for (int64_t m = 0; m < a.M; ++m) {
        float acc = 0.0f;
        for (int64_t j = 0; j < w.KS; ++j) {
          const int64_t kb = j / sub_per_block;
          const uint8_t* tile = codes + (j * nt + t) * 256;
          const int8_t* q = &a.q[static_cast<size_t>((m * w.KS + j) * kSubBlock)];
          int32_t dot = 0;
          for (int c = 0; c < 4; ++c)
            for (int u = 0; u < 4; ++u) {
              const uint8_t byte = tile[c * 64 + col * 4 + u];
              dot += static_cast<int32_t>(byte & 15) * q[8 * c + u];
              dot += static_cast<int32_t>(byte >> 4) * q[8 * c + 4 + u];
            }
          const size_t sidx = static_cast<size_t>((kb * nt + t) * kTile + col);
          const int32_t zp = zeros ? zeros[sidx] : 8;
          const int32_t d = dot - zp * a.sum[static_cast<size_t>(m * w.KS + j)];
          const float s = scales[sidx] * a.scale[static_cast<size_t>(m * w.KS + j)];
          acc = std::fma(static_cast<float>(d), s, acc);
        }
        Y[m * w.N + n] = w.bias.empty() ? acc : acc + w.bias[static_cast<size_t>(n)];
      }
    }
  }
}

// ---- AVX-512 VNNI --------------------------------------------------------------------------------

#if defined(__x86_64__)
#define RD_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

// R rows (m0..m0+R-1) times T tiles (t0..t0+T-1 of group g, nt tiles in it). Accumulators stay in
// registers for the whole of K: R * T integer and R * T float vectors.
template <int R, int T>
RD_VNNI void micro_vnni(const PackedInt4& w, const QuantizedRows& a, int64_t g, int64_t nt,
                        int64_t t0, int64_t m0, float* Y) {
  const uint8_t* codes = w.codes.data() + codes_offset(w, g);
  const float* scales = w.scales.data() + scales_offset(w, g);
  const uint8_t* zeros = w.symmetric ? nullptr : w.zeros.data() + scales_offset(w, g);
  const int64_t sub_per_block = w.block_size / kSubBlock;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < w.KS; ++j) {
    __m512i dot[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) dot[r][t] = _mm512_setzero_si512();
    const uint8_t* tiles = codes + (j * nt + t0) * 256;
    for (int c = 0; c < 4; ++c) {
      __m512i lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const __m512i v = _mm512_loadu_si512(tiles + t * 256 + c * 64);
        lo[t] = _mm512_and_si512(v, low);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* q = &a.q[static_cast<size_t>(((m0 + r) * w.KS + j) * kSubBlock + 8 * c)];
        int32_t q0, q1;
        std::memcpy(&q0, q, 4);
        std::memcpy(&q1, q + 4, 4);
        const __m512i b0 = _mm512_set1_epi32(q0), b1 = _mm512_set1_epi32(q1);
        for (int t = 0; t < T; ++t) {
          dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], lo[t], b0);
          dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], hi[t], b1);
        }
      }
    }
    const int64_t kb = j / sub_per_block;
    for (int t = 0; t < T; ++t) {
      const size_t sidx = static_cast<size_t>((kb * nt + t0 + t) * kTile);
      const __m512 ws = _mm512_loadu_ps(scales + sidx);
      const __m512i zp =
          zeros ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + sidx)))
                : _mm512_set1_epi32(8);
      for (int r = 0; r < R; ++r) {
        const size_t ai = static_cast<size_t>((m0 + r) * w.KS + j);
        // the same integer either way: zp * sum (8 * sum when symmetric, without a vpmulld)
        const __m512i correction = zeros ? _mm512_mullo_epi32(zp, _mm512_set1_epi32(a.sum[ai]))
                                         : _mm512_set1_epi32(8 * a.sum[ai]);
        const __m512i d = _mm512_sub_epi32(dot[r][t], correction);
        const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(a.scale[ai]));
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t n0 = (g * kGroup + t0 + t) * kTile;
    const int64_t valid = std::min(kTile, w.N - n0);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 bias = w.bias.empty() ? _mm512_setzero_ps()
                                       : _mm512_maskz_loadu_ps(mask, w.bias.data() + n0);
    for (int r = 0; r < R; ++r) {
      const __m512 y = w.bias.empty() ? acc[r][t] : _mm512_add_ps(acc[r][t], bias);
      _mm512_mask_storeu_ps(Y + (m0 + r) * w.N + n0, mask, y);
    }
  }
}

// Tiles t0.. of a group for rows m0..m0+R-1, T tiles at a time (as many as the registers hold).
template <int R, int T>
RD_VNNI void rows_vnni(const PackedInt4& w, const QuantizedRows& a, int64_t g, int64_t m0,
                       float* Y) {
  const int64_t nt = group_tiles(w, g);
  int64_t t = 0;
  for (; t + T <= nt; t += T) micro_vnni<R, T>(w, a, g, nt, t, m0, Y);
  for (; t < nt; ++t) micro_vnni<R, 1>(w, a, g, nt, t, m0, Y);
}

// Rows in passes of up to 8 (each pass unpacks the group's codes once for all its rows); the
// tile count per micro-kernel keeps R * T integer + R * T float accumulators in 32 registers.
RD_VNNI void group_vnni(const PackedInt4& w, const QuantizedRows& a, int64_t g, float* Y) {
  for (int64_t m = 0; m < a.M; m += 8) {
    switch (std::min<int64_t>(8, a.M - m)) {
      case 8: rows_vnni<8, 1>(w, a, g, m, Y); break;
      case 7: rows_vnni<7, 1>(w, a, g, m, Y); break;
      case 6: rows_vnni<6, 1>(w, a, g, m, Y); break;
      case 5: rows_vnni<5, 2>(w, a, g, m, Y); break;
      case 4: rows_vnni<4, 2>(w, a, g, m, Y); break;
      case 3: rows_vnni<3, 2>(w, a, g, m, Y); break;
      case 2: rows_vnni<2, 4>(w, a, g, m, Y); break;
      default: rows_vnni<1, 8>(w, a, g, m, Y); break;
    }
  }
}

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}
#else
bool has_vnni() { return false; }
#endif

struct Work {
  const PackedInt4* w;
  const QuantizedRows* a;
  float* Y;
  bool simd;
};

void run_group(void* user, std::size_t g) {
  const Work& work = *static_cast<const Work*>(user);
#if defined(__x86_64__)
  if (work.simd) return group_vnni(*work.w, *work.a, static_cast<int64_t>(g), work.Y);
#endif
  group_portable(*work.w, *work.a, static_cast<int64_t>(g), work.Y);
}

}  // namespace

std::string check_matmul_int4(int64_t K, int64_t N, int64_t block_size, int64_t bits) {
  if (bits != 4) return "MatMulInt4: bits is " + std::to_string(bits) + ", expected 4";
  if (K <= 0 || N <= 0)
    return "MatMulInt4: K and N must be positive, got K=" + std::to_string(K) +
           " N=" + std::to_string(N);
  if (block_size < kSubBlock || block_size % kSubBlock != 0)
    return "MatMulInt4: block_size " + std::to_string(block_size) +
           " must be a multiple of 32 (32, 64, 128, 256)";
  return "";
}

PackedInt4 pack_int4(int64_t K, int64_t N, int64_t block_size, const uint8_t* B,
                     const float* scales, const uint8_t* zero_points, const float* bias) {
  PackedInt4 w;
  w.K = K;
  w.N = N;
  w.block_size = block_size;
  w.KB = ceil_div(K, block_size);
  w.KS = ceil_div(K, kSubBlock);
  w.tiles = ceil_div(N, kTile);
  w.groups = ceil_div(w.tiles, kGroup);
  w.symmetric = zero_points == nullptr;
  const int64_t blob = block_size / 2, zp_stride = ceil_div(w.KB, 2);
  w.codes.assign(static_cast<size_t>(w.tiles * w.KS * 256), 0);
  w.scales.assign(static_cast<size_t>(w.tiles * w.KB * kTile), 0.0f);
  if (!w.symmetric) w.zeros.assign(static_cast<size_t>(w.tiles * w.KB * kTile), 8);
  if (bias) w.bias.assign(bias, bias + N);
  auto code = [&](int64_t n, int64_t k) -> uint8_t {  // w[n, k]; 8 (zero) past K
    if (k >= K) return 8;
    const uint8_t byte = B[(n * w.KB + k / block_size) * blob + (k % block_size) / 2];
    return (k % 2) ? byte >> 4 : byte & 15;
  };
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t nt = group_tiles(w, g);
    uint8_t* codes = w.codes.data() + codes_offset(w, g);
    float* sc = w.scales.data() + scales_offset(w, g);
    uint8_t* zs = w.symmetric ? nullptr : w.zeros.data() + scales_offset(w, g);
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t col = 0; col < kTile; ++col) {
        const int64_t n = (g * kGroup + t) * kTile + col;
        if (n >= N) continue;  // padding columns: code 0, scale 0, never stored
        for (int64_t j = 0; j < w.KS; ++j)
          for (int c = 0; c < 4; ++c)
            for (int u = 0; u < 4; ++u) {
              const int64_t k = j * kSubBlock + 8 * c + u;
              codes[(j * nt + t) * 256 + c * 64 + col * 4 + u] =
                  static_cast<uint8_t>(code(n, k) | code(n, k + 4) << 4);
            }
        for (int64_t kb = 0; kb < w.KB; ++kb) {
          const size_t sidx = static_cast<size_t>((kb * nt + t) * kTile + col);
          sc[sidx] = scales[n * w.KB + kb];
          if (zs) {
            const uint8_t byte = zero_points[n * zp_stride + kb / 2];
            zs[sidx] = (kb % 2) ? byte >> 4 : byte & 15;
          }
        }
      }
  }
  return w;
}

void matmul_int4_cpu(const PackedInt4& w, const float* A, int64_t M, float* Y,
                     const ParallelRunner& runner, bool allow_simd) {
  if (M == 0) return;
  const QuantizedRows a = quantize_rows(A, M, w.K, w.KS);
  // REDRAFTER_CPU_ISA=base forces the portable loop, as for TreeAttention (tests compare them).
  const char* cap = std::getenv("REDRAFTER_CPU_ISA");
  const bool base = cap != nullptr && std::strcmp(cap, "base") == 0;
  Work work{&w, &a, Y, allow_simd && !base && has_vnni()};
  runner.run(static_cast<std::size_t>(w.groups), run_group, &work);
}

}  // namespace redrafter
