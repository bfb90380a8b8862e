// The math of one attention tile, shared by the CUDA kernel, the CPU kernel and the host
// emulation of the CUDA kernel (so the CPU test suite checks, without a GPU, the very functions the
// GPU runs). Only launch geometry and memory staging are GPU-only (tree_attention_cuda.cu).
//
// Compiles as plain C++ (no nvcc): RD_HD is `__host__ __device__` under nvcc, `inline` otherwise.
//
// A query row's softmax is computed online over tiles of keys (flash attention):
//   m  running max of the scores seen so far (-inf before any visible key)
//   l  running sum of exp(s - m)
//   acc running sum of exp(s - m) * v        (lives with the caller: one D-vector per row)
// Folding in a tile with max score t:  m' = max(m, t);  alpha = exp(m - m');  l = l*alpha + sum
// exp(s - m');  acc = acc*alpha + sum exp(s - m') v.  Output = acc / l (0 when no key was visible).
// Partial states over disjoint key ranges (the CUDA kernel's key splits) merge the same way.
#pragma once

#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define RD_HD __host__ __device__ __forceinline__
#else
#define RD_HD inline
#endif

namespace redrafter {
namespace tile {

// ---- fp16 <-> fp32 (float16 tensors are stored as raw uint16_t bits everywhere) ----------------

RD_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    float f = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}

// Round to nearest even, as __float2half_rn and the F16C instructions do.
RD_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: overflow
  if (a < 0x38800000u) {
    // Result is subnormal (|f| < 2^-14): adding 0.5 puts the half's 2^-24 ulp at the float's
    // last mantissa bit, so the FPU's own round-to-nearest-even does the rounding.
    float magic;
    std::memcpy(&magic, &a, 4);
    magic += 0.5f;
    uint32_t r;
    std::memcpy(&r, &magic, 4);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  const uint32_t odd = (a >> 13) & 1u;
  a += 0xc8000fffu + odd;  // rebias the exponent (127 -> 15) and round half to even
  return static_cast<uint16_t>(sign | (a >> 13));
#endif
}

RD_HD float to_float(float x) { return x; }
RD_HD float to_float(uint16_t x) { return half_to_float(x); }

template <typename T>
RD_HD T from_float(float x);
template <>
RD_HD float from_float<float>(float x) { return x; }
template <>
RD_HD uint16_t from_float<uint16_t>(float x) { return float_to_half(x); }

// ---- TreeAttention version 2's prologue ----------------------------------------------------

// Element d of one head's row after rotary: x[d]·cos[d] + rotate_half(x)[d]·sin[d], with HF's
// rotate_half pairs (d, d + D/2), computed in float and rounded once. `row` is the head's D
// values before rotary, `cos`/`sin` the token's D-entry table; cos == nullptr copies (values).
template <typename T>
RD_HD T rotary_element(const T* row, const T* cos, const T* sin, int64_t d, int64_t D) {
  if (cos == nullptr) return row[d];
  const int64_t half = D / 2;
  const float pair = d < half ? -to_float(row[d + half]) : to_float(row[d - half]);
  return from_float<T>(to_float(row[d]) * to_float(cos[d]) + pair * to_float(sin[d]));
}

// ---- grouped-query attention ---------------------------------------------------------------

// Query head h reads key/value head h / G (G = Hq / Hkv), HF's repeat_kv order.
RD_HD int64_t kv_head(int64_t h, int64_t group) { return h / group; }

// The kernels treat the G*N query rows sharing one KV head as one block of rows: row r is query
// head kvh*G + r/N, new token r%N. One K/V tile then serves every query head of the group.
RD_HD int64_t row_query_head(int64_t kvh, int64_t r, int64_t group, int64_t n) {
  return kvh * group + r / n;
}
RD_HD int64_t row_token(int64_t r, int64_t n) { return r % n; }

// ---- the mask test -------------------------------------------------------------------------

// Key t of row b enumerates the cache slots 0..P-1, then the N new tokens (t = P + j).
RD_HD bool key_is_cache_slot(int64_t t, int64_t past) { return t < past; }

// Every committed slot is visible; new token j is visible to new token i iff tree_mask[b, i, j].
// mask_row: tree_mask[b, i, :] (N bytes).
RD_HD bool key_visible(int64_t t, int64_t past, const uint8_t* mask_row) {
  return t < past || mask_row[t - past] != 0;
}

// A visible key's score (the query is pre-multiplied by `scale`), or -inf for a hidden one.
RD_HD float masked_score(float dot, bool visible) { return visible ? dot : -INFINITY; }

// ---- sliding window and soft-capping (the `window` and `softcap` attributes) ----------------

// A new token's depth in its tree: how many new tokens it may attend, minus one (the mask is
// ancestor-or-self, so that is its number of ancestors). It sits at position P + depth, and so
// does its key once committed. mask_row: tree_mask[b, i, :] (N bytes).
RD_HD int64_t new_token_depth(const uint8_t* mask_row, int64_t N) {
  int64_t count = 0;
  for (int64_t j = 0; j < N; ++j) count += mask_row[j] != 0;
  return count - 1;
}

// The first position a query at position `query_pos` may attend: with a window W > 0 it sees the
// keys at p - W < q <= p (transformers' sliding-window mask: the query itself and W - 1 before
// it); W = 0 means no window.
RD_HD int64_t window_start(int64_t query_pos, int64_t window) {
  return window > 0 ? query_pos - window + 1 : INT64_MIN;
}

// The position of key t (cache slot t < P, else new token t - P at P + its depth), for the
// window test. mask_b: tree_mask[b] ([N, N] bytes).
RD_HD int64_t key_position(int64_t t, int64_t past, const uint8_t* mask_b, int64_t N) {
  return t < past ? t : past + new_token_depth(mask_b + (t - past) * N, N);
}

// Where a walk over keys [k_begin, ...) in strides of `step` may start when every row's window
// begins at or after lo_min: strides wholly before it hold hidden keys only, whose fold leaves a
// row's softmax state unchanged, so they are skipped; the strides keep their absolute places.
// Callers cap lo_min at P: a new key's slot can precede its position (P + depth) when the mask
// is not a tree, so only committed keys are ever skipped.
RD_HD int64_t first_walk_key(int64_t k_begin, int64_t lo_min, int64_t step) {
  return lo_min > k_begin ? k_begin + (lo_min - k_begin) / step * step : k_begin;
}

// Gemma 2's soft-capping of a (scaled) score: cap * tanh(s / cap); cap = 0 leaves it alone.
RD_HD float soft_cap(float s, float cap) { return cap > 0.0f ? cap * tanhf(s / cap) : s; }

// ---- online softmax ------------------------------------------------------------------------

struct RowSoftmax {
  float m;  // running max; -inf while no visible key has been seen
  float l;  // running sum of exp(s - m)
};

RD_HD RowSoftmax row_softmax_init() { return RowSoftmax{-INFINITY, 0.0f}; }

// Moves the running max to cover a tile whose largest score is tile_max. Returns alpha, the
// factor by which the caller must scale its accumulator (l is scaled here). A tile of hidden keys
// only (tile_max = -inf) leaves the state unchanged; the guard keeps exp(-inf - -inf) out.
RD_HD float row_softmax_rescale(RowSoftmax& r, float tile_max) {
  const float m_new = fmaxf(r.m, tile_max);
  const float alpha = (m_new == -INFINITY) ? 1.0f : expf(r.m - m_new);
  r.m = m_new;
  r.l *= alpha;
  return alpha;
}

// exp(s - m) for a score of the tile just folded in; 0 for a hidden key.
RD_HD float row_softmax_weight(const RowSoftmax& r, float s) {
  return s == -INFINITY ? 0.0f : expf(s - r.m);
}

// Adds the tile's sum of weights.
RD_HD void row_softmax_add(RowSoftmax& r, float tile_sum) { r.l += tile_sum; }

// 1 / l, or 0 for a row that saw no visible key (its accumulator is 0 too).
RD_HD float row_softmax_inv_sum(const RowSoftmax& r) { return r.l > 0.0f ? 1.0f / r.l : 0.0f; }

// Merging partial states over disjoint key ranges: with m_total the max of the parts' m, part p
// contributes weight exp(m_p - m_total) to both l and acc. An empty part (m_p = -inf) weighs 0.
RD_HD float merge_weight(float m_part, float m_total) {
  return m_part == -INFINITY ? 0.0f : expf(m_part - m_total);
}

// ---- launch plan of the CUDA kernel (host code; also followed by the host emulation) -----------

constexpr int kTileKeys = 32;          // keys per tile: one per lane of a warp
constexpr int kWarps = 4;              // warps per block; each walks its own tiles of the keys
constexpr int kMinKeysPerSplit = 256;  // never split the keys finer than this
constexpr int kMaxSplits = 1024;
constexpr int kMaxHeadDim = 128;   // staging K/V tiles of wider heads would not fit
constexpr int kMaxBatch = 256;         // past_len travels as a kernel argument

// Query rows a block carries (every warp holds all of them in registers): fewer for wide heads,
// and few when the problem is too small to fill the GPU with blocks otherwise.
constexpr int kFewRowsPerBlock = 4;
RD_HD int rows_per_block(int64_t D) { return D <= 64 ? 16 : 8; }

struct LaunchPlan {
  int64_t rows_per_block;  // rows_per_block(D), or kFewRowsPerBlock
  int64_t row_chunks;      // blocks along the G*N rows of one KV head
  int64_t splits;          // blocks along the keys (flash-decoding); 1: no combine pass
  int64_t keys_per_split;  // a multiple of kWarps * kTileKeys
};

// Enough blocks to fill the GPU twice over, but no split shorter than kMinKeysPerSplit keys.
// max_keys = max_b P_b + N.
inline LaunchPlan plan_launch(int64_t B, int64_t Hkv, int64_t group, int64_t N, int64_t D,
                              int64_t max_keys, int num_sms) {
  LaunchPlan p;
  const int64_t target = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  const int64_t max_splits = (max_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  p.rows_per_block = rows_per_block(D);
  if (B * Hkv * ((group * N + p.rows_per_block - 1) / p.rows_per_block) * max_splits < target)
    p.rows_per_block = kFewRowsPerBlock;  // small problem: more, lighter blocks
  p.row_chunks = (group * N + p.rows_per_block - 1) / p.rows_per_block;
  const int64_t base = B * Hkv * p.row_chunks;
  int64_t splits = (target + base - 1) / base;
  if (splits > max_splits) splits = max_splits;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  const int64_t step = kWarps * kTileKeys;
  int64_t per = (max_keys + splits - 1) / splits;
  per = (per + step - 1) / step * step;
  p.keys_per_split = per;
  p.splits = (max_keys + per - 1) / per;
  return p;
}

}  // namespace tile
}  // namespace redrafter
