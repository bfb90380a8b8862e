// redrafter::MatMulInt4 on the CPU (semantics: matmul_int4.h). Three code paths with
// bit-identical results: AVX-512 VNNI (vpdpbusd multiplies 4 unsigned codes by 4 signed
// activation bytes per lane) where the CPU has it, AMX-INT8 (tdpbssd: 8 rows x 16 outputs x 2
// sub-blocks of 32 codes per instruction; opt-in, see kAmxMinRows), and a portable loop
// elsewhere. Only the exact integer sums are computed differently; the float steps are the same
// operations in the same order.
#include "matmul_int4.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
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
  const float* offsets = w.offsets.empty() ? nullptr : w.offsets.data() + scales_offset(w, g);
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
          const float as = a.scale[static_cast<size_t>(m * w.KS + j)];
          acc = std::fma(static_cast<float>(d), scales[sidx] * as, acc);
          if (offsets)
            acc = std::fma(offsets[sidx],
                           as * static_cast<float>(a.sum[static_cast<size_t>(m * w.KS + j)]), acc);
        }
        Y[m * w.N + n] = w.bias.empty() ? acc : acc + w.bias[static_cast<size_t>(n)];
      }
    }
  }
}

// ---- AVX-512 VNNI --------------------------------------------------------------------------------

#if defined(__x86_64__)
#define RD_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

// How a weight's zero points enter the fold, fixed per instantiation so that the kernels for the
// common symmetric case carry no test for the others, and the float one no integer correction.
enum class Zeros { kSymmetric, kInteger, kFloat };

Zeros zeros_of(const PackedInt4& w) {
  return !w.offsets.empty() ? Zeros::kFloat : w.symmetric ? Zeros::kSymmetric : Zeros::kInteger;
}

// R rows (m0..m0+R-1) times T tiles (t0..t0+T-1 of group g, nt tiles in it). Accumulators stay in
// registers for the whole of K: R * T integer and R * T float vectors.
template <int R, int T, Zeros Z>
RD_VNNI void micro_vnni(const PackedInt4& w, const QuantizedRows& a, int64_t g, int64_t nt,
                        int64_t t0, int64_t m0, float* Y) {
  const uint8_t* codes = w.codes.data() + codes_offset(w, g);
  const float* scales = w.scales.data() + scales_offset(w, g);
  const uint8_t* zeros = Z == Zeros::kInteger ? w.zeros.data() + scales_offset(w, g) : nullptr;
  const float* offsets = Z == Zeros::kFloat ? w.offsets.data() + scales_offset(w, g) : nullptr;
  const int64_t sub_per_block = w.block_size / kSubBlock;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  // With several rows a group takes several passes of T tiles, each reading its tiles' 256
  // bytes per sub-block at a stride of a whole group's: a pattern the hardware prefetchers follow
  // poorly, so a tree verify (2-10 rows) waited on memory for half its matmul time. Each pass
  // therefore prefetches the same T tiles of the NEXT group (which this thread runs next: ORT
  // hands each thread a contiguous range of groups), one sub-block per step of its own loop, so
  // the whole next group arrives while this one is computed. (Prefetching only one pass ahead,
  // the next T tiles of this group, left the first row pass of each group waiting on memory and
  // the later ones, which hit the cache, with nothing to fetch: 0.1-0.65 ms slower per verify of
  // 2-8 tokens.) One row reads whole groups in order, which the prefetchers already stream: no
  // hints there (they made a one-token step slower). Measured: benchmarks/RESULTS.md, issue 22.
  const uint8_t* next = nullptr;
  int64_t next_stride = 0, next_lines = 0;
  if (R > 1 && g + 1 < w.groups) {
    const int64_t next_nt = group_tiles(w, g + 1);
    if (t0 < next_nt) {
      next = w.codes.data() + codes_offset(w, g + 1) + t0 * 256;
      next_stride = next_nt * 256;
      next_lines = 4 * std::min<int64_t>(T, next_nt - t0);
    }
  }
  for (int64_t j = 0; j < w.KS; ++j) {
    for (int64_t l = 0; l < next_lines; ++l)  // to L2: a pass's codes can outgrow L1 (K = 1536)
      _mm_prefetch(reinterpret_cast<const char*>(next + j * next_stride + l * 64), _MM_HINT_T1);
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
    const float* as = &a.scale[static_cast<size_t>(m0 * w.KS + j)];  // row r at as[r * KS]
    for (int t = 0; t < T; ++t) {
      const size_t sidx = static_cast<size_t>((kb * nt + t0 + t) * kTile);
      const __m512 ws = _mm512_loadu_ps(scales + sidx);
      if constexpr (Z == Zeros::kFloat) {
        // d = dot (integer zero 0), then the offset's term: matmul_int4.h's float order
        for (int r = 0; r < R; ++r) {
          const size_t ai = static_cast<size_t>((m0 + r) * w.KS + j);
          const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(a.scale[ai]));
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), s, acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(_mm512_loadu_ps(offsets + sidx),
                                      _mm512_set1_ps(a.scale[ai] * static_cast<float>(a.sum[ai])),
                                      acc[r][t]);
        }
      } else {
        __m512i zp = _mm512_set1_epi32(8);
        if constexpr (Z == Zeros::kInteger)
          zp = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + sidx)));
        for (int r = 0; r < R; ++r) {
          const int32_t sum = a.sum[static_cast<size_t>((m0 + r) * w.KS + j)];
          // the same integer either way: zp * sum (8 * sum when symmetric, without a vpmulld)
          const __m512i correction = Z == Zeros::kInteger
                                         ? _mm512_mullo_epi32(zp, _mm512_set1_epi32(sum))
                                         : _mm512_set1_epi32(8 * sum);
          const __m512i d = _mm512_sub_epi32(dot[r][t], correction);
          const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(as[r * w.KS]));
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][t]);
        }
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
template <int R, int T, Zeros Z>
RD_VNNI void rows_vnni(const PackedInt4& w, const QuantizedRows& a, int64_t g, int64_t m0,
                       float* Y) {
  const int64_t nt = group_tiles(w, g);
  int64_t t = 0;
  for (; t + T <= nt; t += T) micro_vnni<R, T, Z>(w, a, g, nt, t, m0, Y);
  for (; t < nt; ++t) micro_vnni<R, 1, Z>(w, a, g, nt, t, m0, Y);
}

// Rows in passes of 4 (each pass unpacks the group's codes once for all its rows), two tiles at a
// time, then the 1-3 rows left with as many tiles as the registers hold. Passes of up to 8 rows
// had to take one tile at a time (16 integer + 16 float accumulators fill the 32 registers), and
// on the AMD EPYC VM such passes ran a tree verify's matmuls far slower than two 4-row passes
// (verify of 8 tokens 13.6 against 17.8 ms, of 12 tokens 16.1 against 21.2; a 128-token prefill
// 4 % faster): benchmarks/RESULTS.md, issue 22. The results are the same bits either way.
//
// A row count of 4k + 1 (5, 9, 13: the commonest tree sizes of a pruned W1 L5 + lookup draft)
// ends with one pass of 5 rows instead of 4 + 1: the lone row's pass unpacked the whole group
// again for one row, a one-token matmul's work on top (a verify of 5 tokens cost 1.2x one of 4).
// Five rows, two tiles: 10 integer + 10 float accumulators, 4 unpacked code vectors and the
// broadcasts still fit the 32 registers.
template <Zeros Z>
RD_VNNI void group_vnni_with(const PackedInt4& w, const QuantizedRows& a, int64_t g, float* Y) {
  int64_t m = 0;
  const int64_t fours = a.M % 4 == 1 && a.M >= 5 ? a.M - 5 : a.M - a.M % 4;
  for (; m < fours; m += 4) rows_vnni<4, 2, Z>(w, a, g, m, Y);
  if (a.M - m == 5) {
    rows_vnni<5, 2, Z>(w, a, g, m, Y);
    return;
  }
  switch (a.M - m) {
    case 3: rows_vnni<3, 2, Z>(w, a, g, m, Y); break;
    case 2: rows_vnni<2, 4, Z>(w, a, g, m, Y); break;
    case 1: rows_vnni<1, 8, Z>(w, a, g, m, Y); break;
    default: break;
  }
}

RD_VNNI void group_vnni(const PackedInt4& w, const QuantizedRows& a, int64_t g, float* Y) {
  switch (zeros_of(w)) {
    case Zeros::kSymmetric: return group_vnni_with<Zeros::kSymmetric>(w, a, g, Y);
    case Zeros::kInteger: return group_vnni_with<Zeros::kInteger>(w, a, g, Y);
    case Zeros::kFloat: return group_vnni_with<Zeros::kFloat>(w, a, g, Y);
  }
}

// quantize_rows with AVX-512, two vectors per sub-block: the same values bit for bit (max is
// exact in any order, the division and product are the same single roundings, and roundscale
// to nearest-even is nearbyint in the default rounding mode).
RD_VNNI QuantizedRows quantize_rows_avx512(const float* A, int64_t M, int64_t K, int64_t KS) {
  QuantizedRows r;
  r.M = M;
  r.KS = KS;
  r.q.assign(static_cast<size_t>(M * KS * kSubBlock), 0);
  r.scale.assign(static_cast<size_t>(M * KS), 0.0f);
  r.sum.assign(static_cast<size_t>(M * KS), 0);
  const __m512 limit = _mm512_set1_ps(127.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    for (int64_t j = 0; j < KS; ++j) {
      const int64_t k0 = j * kSubBlock, n = std::min(kSubBlock, K - k0);
      const __mmask16 m0 = static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1u);
      const __mmask16 m1 =
          static_cast<__mmask16>(n >= 32 ? 0xffff : n <= 16 ? 0 : (1u << (n - 16)) - 1u);
      const __m512 x0 = _mm512_maskz_loadu_ps(m0, a + k0);
      const __m512 x1 = _mm512_maskz_loadu_ps(m1, a + k0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      if (amax == 0.0f) continue;  // an all-zero sub-block adds exactly nothing
      const __m512 inv = _mm512_set1_ps(127.0f / amax);
      constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(
          limit, _mm512_max_ps(-limit, _mm512_roundscale_ps(_mm512_mul_ps(x0, inv), kNearest))));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(
          limit, _mm512_max_ps(-limit, _mm512_roundscale_ps(_mm512_mul_ps(x1, inv), kNearest))));
      int8_t* q = &r.q[static_cast<size_t>(m * KS * kSubBlock + k0)];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
      r.scale[static_cast<size_t>(m * KS + j)] = amax / 127.0f;
      r.sum[static_cast<size_t>(m * KS + j)] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
  }
  return r;
}

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}

// ---- AMX-INT8 ------------------------------------------------------------------------------------
//
// tdpbssd C[i][n] += sum_k A[i][k] * B[k / 4][4n + k % 4] (int8 x int8 -> exact int32). B wants,
// per row, 4 consecutive codes of each of 16 columns: exactly what a packed chunk holds after a
// mask (codes k0 + 8c .. + 3) or a shift and mask (k0 + 8c + 4 .. + 7). So B is unpacked per call
// from the one packed copy (2 vector ops per 64 bytes) rather than kept as a second, int8 copy
// that would double the weight bytes each call reads from memory.
//
// A product must not sum across 32-wide sub-blocks (each has its own scales), yet an instruction
// reduces over up to 64 codes, and a tile store costs the same whatever the rows. So each
// instruction takes a PAIR of sub-blocks (2p, 2p + 1) for R <= 8 activation rows: A holds row r
// twice, as [q(r, 2p) | 0] (tile row 2r) and [0 | q(r, 2p + 1)] (tile row 2r + 1), and B the 64
// codes of both sub-blocks, so C row 2r is sub-block 2p's exact sum and row 2r + 1 sub-block
// 2p + 1's: the same integers the other paths form, one store for two sub-blocks. They then go
// through the same float steps in the same order (matmul_int4.h).

#define RD_AMX                                                                                  \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,amx-tile,amx-int8")))

constexpr int64_t kAmxRows = 8;  // activation rows per tile product (2 tile rows each)

// The activation in the tiles' layout: for each block of up to 8 rows starting at m0 (R rows),
// at byte m0 * KP * 128: [KP pairs][2R tile rows][64 bytes], zero where a row holds no codes.
std::vector<int8_t> pair_rows(const QuantizedRows& a) {
  const int64_t KP = ceil_div(a.KS, 2);
  std::vector<int8_t> out(static_cast<size_t>(a.M * KP * 128), 0);
  for (int64_t m0 = 0; m0 < a.M; m0 += kAmxRows) {
    const int64_t R = std::min(kAmxRows, a.M - m0);
    int8_t* block = out.data() + m0 * KP * 128;
    for (int64_t p = 0; p < KP; ++p)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t h = 0; h < 2 && 2 * p + h < a.KS; ++h)
          std::memcpy(block + (p * 2 * R + 2 * r + h) * 64 + h * kSubBlock,
                      &a.q[static_cast<size_t>(((m0 + r) * a.KS + 2 * p + h) * kSubBlock)],
                      kSubBlock);
  }
  return out;
}

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 = A (2R x 64 bytes); 2, 3 = B (16 x 64 bytes); 4..7 = C (2R x 16 int32). Each kind
// is used in rotation, so a load never waits for the products still reading the previous one
// and up to 4 products are in flight.
TileConfig tile_config(int64_t R) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(t == 2 || t == 3 ? 16 : 2 * R);
    c.colsb[t] = 64;
  }
  return c;
}

// The B tiles of one output tile, pair by pair: [KP][16][64], tile row 8h + 2c = the low
// nibbles of chunk c of sub-block 2p + h, row 8h + 2c + 1 = its high nibbles (zero past KS).
RD_AMX void unpack_b(const PackedInt4& w, const uint8_t* codes, int64_t nt, int64_t t,
                     uint8_t* b) {
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t j = 0; j < w.KS; ++j) {
    const uint8_t* packed = codes + (j * nt + t) * 256;
    uint8_t* out = b + j * 512;  // [j / 2][8 * (j % 2) ..][64] is contiguous in j
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(packed + c * 64);
      _mm512_store_si512(out + (2 * c) * 64, _mm512_and_si512(v, low));
      _mm512_store_si512(out + (2 * c + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
  }
  if (w.KS % 2) std::memset(b + w.KS * 512, 0, 512);
}

// One output tile's products, pair by pair, into dot [KP][2R][16]. Up to 4 are in flight: the
// product of pair p goes to C register 4 + p % 4 and is stored 3 pairs later.
RD_AMX void products(const int8_t* a_pairs, const uint8_t* b, int64_t KP, int64_t R,
                     int32_t* dot) {
  const int64_t a_bytes = 2 * R * 64, c_ints = 2 * R * kTile;
#define RD_AMX_PRODUCT(p, AT, BT, CT)                     \
  if ((p) < KP) {                                         \
    _tile_loadd(AT, a_pairs + (p) * a_bytes, 64);         \
    _tile_loadd(BT, b + (p) * 1024, 64);                  \
    _tile_zero(CT);                                       \
    _tile_dpbssd(CT, AT, BT);                             \
  }
#define RD_AMX_STORE(p, CT) \
  if ((p) >= 0 && (p) < KP) _tile_stored(CT, dot + (p) * c_ints, kTile * 4);
  for (int64_t p = 0; p < KP; p += 4) {
    RD_AMX_PRODUCT(p, 0, 2, 4)
    RD_AMX_STORE(p - 3, 5)
    RD_AMX_PRODUCT(p + 1, 1, 3, 5)
    RD_AMX_STORE(p - 2, 6)
    RD_AMX_PRODUCT(p + 2, 0, 2, 6)
    RD_AMX_STORE(p - 1, 7)
    RD_AMX_PRODUCT(p + 3, 1, 3, 7)
    RD_AMX_STORE(p, 4)
  }
  const int64_t end = ceil_div(KP, 4) * 4;
  RD_AMX_STORE(end - 3, 5)
  RD_AMX_STORE(end - 2, 6)
  RD_AMX_STORE(end - 1, 7)
#undef RD_AMX_PRODUCT
#undef RD_AMX_STORE
}

// Y[m0 + r, tile t] = bias + the sub-block sums of dot folded in order j = 0.. (matmul_int4.h),
// with the same operations as micro_vnni's epilogue; the R rows' accumulators stay in registers.
template <int R>
RD_AMX void fold(const PackedInt4& w, const QuantizedRows& a, int64_t g, int64_t nt, int64_t t,
                 int64_t m0, const int32_t* dot, float* Y) {
  const float* scales = w.scales.data() + scales_offset(w, g);
  const uint8_t* zeros = w.symmetric ? nullptr : w.zeros.data() + scales_offset(w, g);
  const float* offsets = w.offsets.empty() ? nullptr : w.offsets.data() + scales_offset(w, g);
  const int64_t sub_per_block = w.block_size / kSubBlock;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const float* as = &a.scale[static_cast<size_t>(m0 * w.KS)];  // [R][KS]
  const int32_t* asum = &a.sum[static_cast<size_t>(m0 * w.KS)];  // [R][KS]
  for (int64_t j = 0, kb = 0, jb = 0; j < w.KS; ++j) {  // kb = j / sub_per_block, jb its rest
    const size_t sidx = static_cast<size_t>((kb * nt + t) * kTile);
    if (++jb == sub_per_block) jb = 0, ++kb;
    const __m512 ws = _mm512_loadu_ps(scales + sidx);
    const __m512i zp = zeros ? _mm512_cvtepu8_epi32(
                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + sidx)))
                             : _mm512_set1_epi32(8);
    const int32_t* pair = dot + ((j / 2) * 2 * R + j % 2) * kTile;  // tile row 2r + j % 2
    for (int r = 0; r < R; ++r) {
      const int64_t ai = r * w.KS + j;
      const __m512i correction = offsets ? _mm512_setzero_si512()
                                 : zeros ? _mm512_mullo_epi32(zp, _mm512_set1_epi32(asum[ai]))
                                         : _mm512_set1_epi32(8 * asum[ai]);
      const __m512i d = _mm512_sub_epi32(_mm512_load_si512(pair + 2 * r * kTile), correction);
      const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(as[ai]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
      if (offsets)
        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(offsets + sidx),
                                 _mm512_set1_ps(as[ai] * static_cast<float>(asum[ai])), acc[r]);
    }
  }
  const int64_t n0 = (g * kGroup + t) * kTile;
  const int64_t valid = std::min(kTile, w.N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 bias = w.bias.empty() ? _mm512_setzero_ps()
                                     : _mm512_maskz_loadu_ps(mask, w.bias.data() + n0);
  for (int r = 0; r < R; ++r) {
    const __m512 y = w.bias.empty() ? acc[r] : _mm512_add_ps(acc[r], bias);
    _mm512_mask_storeu_ps(Y + (m0 + r) * w.N + n0, mask, y);
  }
}

RD_AMX void fold_rows(const PackedInt4& w, const QuantizedRows& a, int64_t g, int64_t nt,
                      int64_t t, int64_t m0, int64_t R, const int32_t* dot, float* Y) {
  switch (R) {
    case 8: return fold<8>(w, a, g, nt, t, m0, dot, Y);
    case 7: return fold<7>(w, a, g, nt, t, m0, dot, Y);
    case 6: return fold<6>(w, a, g, nt, t, m0, dot, Y);
    case 5: return fold<5>(w, a, g, nt, t, m0, dot, Y);
    case 4: return fold<4>(w, a, g, nt, t, m0, dot, Y);
    case 3: return fold<3>(w, a, g, nt, t, m0, dot, Y);
    case 2: return fold<2>(w, a, g, nt, t, m0, dot, Y);
    default: return fold<1>(w, a, g, nt, t, m0, dot, Y);
  }
}

// Rows m0..m0+R-1 (R <= 8) of group g, tile by tile and software-pipelined: while the tile unit
// multiplies tile t, the vector units unpack the codes of tile t + 1 and fold the products of
// tile t - 1, so no vector load waits for a tile store just made, nor a tile load for vector
// stores (they do not forward). Tiles are configured here and released before returning, so a
// pool thread never keeps AMX state (8 KiB more per context switch) between work items.
RD_AMX void rows_amx(const PackedInt4& w, const QuantizedRows& a, const int8_t* a_pairs,
                     int64_t g, int64_t m0, int64_t R, float* Y) {
  const int64_t nt = group_tiles(w, g);
  const int64_t KP = ceil_div(w.KS, 2);
  const uint8_t* codes = w.codes.data() + codes_offset(w, g);
  // per thread, reused across calls: [2][KP][16][64] codes and [2][KP][2R][16] sums
  thread_local std::vector<uint8_t> b_buffer;
  thread_local std::vector<int32_t> dot_buffer;
  b_buffer.resize(static_cast<size_t>(2 * KP * 1024 + 64));
  dot_buffer.resize(static_cast<size_t>(2 * KP * 2 * kAmxRows * kTile + 16));
  uint8_t* b = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(b_buffer.data()) + 63) &
                                          ~uintptr_t{63});
  int32_t* dot = reinterpret_cast<int32_t*>(
      (reinterpret_cast<uintptr_t>(dot_buffer.data()) + 63) & ~uintptr_t{63});
  const int64_t b_size = KP * 1024, dot_size = KP * 2 * R * kTile;
  const TileConfig config = tile_config(R);
  _tile_loadconfig(&config);
  unpack_b(w, codes, nt, 0, b);
  for (int64_t t = 0; t < nt; ++t) {
    products(a_pairs, b + (t % 2) * b_size, KP, R, dot + (t % 2) * dot_size);
    if (t + 1 < nt) unpack_b(w, codes, nt, t + 1, b + ((t + 1) % 2) * b_size);
    if (t > 0) fold_rows(w, a, g, nt, t - 1, m0, R, dot + ((t - 1) % 2) * dot_size, Y);
  }
  _tile_release();
  fold_rows(w, a, g, nt, nt - 1, m0, R, dot + ((nt - 1) % 2) * dot_size, Y);
}

RD_AMX void group_amx(const PackedInt4& w, const QuantizedRows& a, const int8_t* a_pairs,
                      int64_t g, float* Y) {
  const int64_t KP = ceil_div(w.KS, 2);
  for (int64_t m = 0; m < a.M; m += kAmxRows)
    rows_amx(w, a, a_pairs + m * KP * 128, g, m, std::min(kAmxRows, a.M - m), Y);
}

// AMX-TILE and AMX-INT8 in cpuid, tile state enabled by the OS (XCR0 bits 17, 18), and Linux's
// permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM, process-wide), asked once: a magic static
// is initialised by exactly one thread. Refused or absent: false (VNNI then).
bool has_amx() {
  static const bool yes = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG, XTILEDATA
    constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023, kXtileData = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kXtileData) != 0) return false;
    unsigned long permitted = 0;
    if (syscall(SYS_arch_prctl, kGetPerm, &permitted) != 0) return false;
    return (permitted & (1ul << kXtileData)) != 0;
  }();
  return yes;
}
#else
bool has_vnni() { return false; }
bool has_amx() { return false; }
#endif

enum class Path { kPortable, kVnni, kAmx };

struct Work {
  const PackedInt4* w;
  const QuantizedRows* a;
  const int8_t* a_pairs;  // the AMX path's activation layout (pair_rows)
  float* Y;
  Path path;
};

void run_group(void* user, std::size_t g) {
  const Work& work = *static_cast<const Work*>(user);
#if defined(__x86_64__)
  if (work.path == Path::kAmx)
    return group_amx(*work.w, *work.a, work.a_pairs, static_cast<int64_t>(g), work.Y);
  if (work.path == Path::kVnni)
    return group_vnni(*work.w, *work.a, static_cast<int64_t>(g), work.Y);
#endif
  group_portable(*work.w, *work.a, static_cast<int64_t>(g), work.Y);
}

// The path for M rows. REDRAFTER_CPU_ISA (read at each call, so tests can switch it) picks one:
// base = the portable loop, vnni = AVX-512 VNNI at every M, amx = AMX at every M (M = 1 too);
// unset (or any other value, e.g. avx2, which caps TreeAttention's clones) = the best path: AMX
// from kAmxMinRows rows (0: never), VNNI below, the portable loop without either. Forcing a path
// this CPU or OS cannot run is an error rather than a silent fallback, so a test proves which
// path it ran.
Path choose_path(int64_t M, bool allow_simd) {
  const char* cap = std::getenv("REDRAFTER_CPU_ISA");
  const std::string isa = cap ? cap : "";
  if (isa == "base" || !allow_simd) return Path::kPortable;
  if (isa == "vnni") {
    if (!has_vnni())
      throw std::runtime_error(
          "MatMulInt4: REDRAFTER_CPU_ISA=vnni but this CPU has no AVX-512 VNNI; unset it or use "
          "base");
    return Path::kVnni;
  }
  if (isa == "amx") {
    if (!(has_vnni() && has_amx()))
      throw std::runtime_error(
          "MatMulInt4: REDRAFTER_CPU_ISA=amx but AMX-INT8 is not usable here (CPU, or the OS "
          "refused arch_prctl); unset it or use vnni or base");
    return Path::kAmx;
  }
  if (!has_vnni()) return Path::kPortable;
  return kAmxMinRows > 0 && M >= kAmxMinRows && has_amx() ? Path::kAmx : Path::kVnni;
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
                     const float* scales, const uint8_t* zero_points,
                     const float* float_zero_points, const float* bias) {
  if (zero_points && float_zero_points)
    throw std::invalid_argument("pack_int4: both integer and float zero points");
  PackedInt4 w;
  w.K = K;
  w.N = N;
  w.block_size = block_size;
  w.KB = ceil_div(K, block_size);
  w.KS = ceil_div(K, kSubBlock);
  w.tiles = ceil_div(N, kTile);
  w.groups = ceil_div(w.tiles, kGroup);
  w.symmetric = zero_points == nullptr && float_zero_points == nullptr;
  const int64_t blob = block_size / 2, zp_stride = ceil_div(w.KB, 2);
  w.codes.assign(static_cast<size_t>(w.tiles * w.KS * 256), 0);
  w.scales.assign(static_cast<size_t>(w.tiles * w.KB * kTile), 0.0f);
  // Float zero points: integer zero 0 (the codes stay unsigned), the rest in `offsets`.
  if (!w.symmetric)
    w.zeros.assign(static_cast<size_t>(w.tiles * w.KB * kTile), float_zero_points ? 0 : 8);
  if (float_zero_points) w.offsets.assign(static_cast<size_t>(w.tiles * w.KB * kTile), 0.0f);
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
    uint8_t* zs = zero_points ? w.zeros.data() + scales_offset(w, g) : nullptr;
    float* os = float_zero_points ? w.offsets.data() + scales_offset(w, g) : nullptr;
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
          if (os) os[sidx] = -(float_zero_points[n * w.KB + kb] * scales[n * w.KB + kb]);
        }
      }
  }
  return w;
}

void matmul_int4_cpu(const PackedInt4& w, const float* A, int64_t M, float* Y,
                     const ParallelRunner& runner, bool allow_simd) {
  if (M == 0) return;
  const Path path = choose_path(M, allow_simd);
#if defined(__x86_64__)
  const QuantizedRows a = path == Path::kPortable ? quantize_rows(A, M, w.K, w.KS)
                                                  : quantize_rows_avx512(A, M, w.K, w.KS);
#else
  const QuantizedRows a = quantize_rows(A, M, w.K, w.KS);
#endif
#if defined(__x86_64__)
  const std::vector<int8_t> a_pairs = path == Path::kAmx ? pair_rows(a) : std::vector<int8_t>();
#else
  const std::vector<int8_t> a_pairs;
#endif
  Work work{&w, &a, a_pairs.data(), Y, path};
  runner.run(static_cast<std::size_t>(w.groups), run_group, &work);
}

}  // namespace redrafter
