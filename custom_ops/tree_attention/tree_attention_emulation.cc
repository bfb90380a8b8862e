// The CUDA kernel (tree_attention_cuda.cu) run sequentially on the host, for the CPU test suite:
// the same launch plan (tile::plan_launch), block -> (split, KV head, row chunk) mapping, warp ->
// interleaved 32-key tiles, lane -> key scores with a per-lane running sum, warp reductions (as
// loops over lanes), the in-block merge of the warps and the split combine, all through the same
// __host__ __device__ functions of tile_math.h. Only what is GPU-only is not reproduced: shared
// memory, shuffles, vector loads and the parallel schedule.
#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "tile_math.h"
#include "tree_attention.h"

namespace redrafter {
namespace {

using tile::kTileKeys;
using tile::kWarps;

template <typename T>
void emulate(const TreeAttentionArgs& a, int num_sms) {
  const int64_t B = a.B, Hq = a.Hq, Hkv = a.Hkv, N = a.N, D = a.D, S = a.S, G = a.group();
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) max_keys = std::max(max_keys, a.past_len[b] + N);
  const tile::LaunchPlan plan = tile::plan_launch(B, Hkv, G, N, D, max_keys, num_sms);
  const int64_t RB = plan.rows_per_block;
  const int64_t out_rows = B * Hq * N;
  std::vector<float> partial(plan.splits > 1 ? plan.splits * out_rows * (D + 2) : 0);

  const std::size_t bytes = a.cache_bytes();
  if (a.key_cache_out != a.key_cache) std::memcpy(a.key_cache_out, a.key_cache, bytes);
  if (a.value_cache_out != a.value_cache) std::memcpy(a.value_cache_out, a.value_cache, bytes);

  const T* query = static_cast<const T*>(a.query);
  std::vector<float> qs(RB * D), s(RB * kTileKeys), ps(RB * kTileKeys);
  // Per warp: m per row (warp-uniform), l per row and lane, acc per row.
  std::vector<float> m(kWarps * RB), l(kWarps * RB * kTileKeys), acc(kWarps * RB * D);

  for (int64_t chunk = 0; chunk < plan.row_chunks; ++chunk)
    for (int64_t head = 0; head < B * Hkv; ++head)
      for (int64_t split = 0; split < plan.splits; ++split) {
        const int64_t b = head / Hkv, kvh = head % Hkv;
        const int64_t P = a.past_len[b];
        const int64_t k_begin = split * plan.keys_per_split;
        const int64_t k_end = std::min(P + N, k_begin + plan.keys_per_split);
        const int64_t r0 = chunk * RB;
        const int64_t rows = std::min(RB, G * N - r0);
        const T* key = static_cast<const T*>(a.key) + head * N * D;
        const T* value = static_cast<const T*>(a.value) + head * N * D;
        const T* key_cache = static_cast<const T*>(a.key_cache) + head * S * D;
        const T* value_cache = static_cast<const T*>(a.value_cache) + head * S * D;

        if (split == 0 && chunk == 0) {  // the cache write of the first block
          std::memcpy(static_cast<T*>(a.key_cache_out) + (head * S + P) * D, key,
                      N * D * sizeof(T));
          std::memcpy(static_cast<T*>(a.value_cache_out) + (head * S + P) * D, value,
                      N * D * sizeof(T));
        }
        for (int64_t e = 0; e < RB * D; ++e) {
          const int64_t r = e / D, d = e % D;
          float q = 0.0f;
          if (r < rows) {
            const int64_t h = tile::row_query_head(kvh, r0 + r, G, N);
            const int64_t i = tile::row_token(r0 + r, N);
            q = tile::to_float(query[((b * Hq + h) * N + i) * D + d]) * a.scale;
          }
          qs[e] = q;
        }

        // Sliding window: each row's first position and the walk's start, as the kernel.
        const uint8_t* mask_b = a.tree_mask + b * N * N;
        std::vector<int64_t> lo(RB, INT64_MIN);
        int64_t lo_min = P;  // never past P (tile_math.h: first_walk_key)
        for (int64_t r = 0; r < RB; ++r) {
          if (a.window > 0 && r < rows) {
            const int64_t i = tile::row_token(r0 + r, N);
            lo[r] = tile::window_start(P + tile::new_token_depth(mask_b + i * N, N), a.window);
          }
          lo_min = std::min(lo_min, lo[r]);
        }
        const int64_t walk_begin =
            a.window > 0 ? tile::first_walk_key(k_begin, lo_min, kWarps * kTileKeys) : k_begin;

        for (int w = 0; w < kWarps; ++w) {
          float* wm = m.data() + w * RB;
          float* wl = l.data() + w * RB * kTileKeys;
          float* wacc = acc.data() + w * RB * D;
          std::fill(wm, wm + RB, -INFINITY);
          std::fill(wl, wl + RB * kTileKeys, 0.0f);
          std::fill(wacc, wacc + RB * D, 0.0f);
          for (int64_t t0 = walk_begin + w * kTileKeys; t0 < k_end; t0 += kWarps * kTileKeys) {
            for (int lane = 0; lane < kTileKeys; ++lane) {  // scores, lane = key
              const int64_t t = t0 + lane;
              for (int64_t r = 0; r < RB; ++r) s[r * kTileKeys + lane] = 0.0f;
              if (t >= k_end) continue;
              const bool cached = tile::key_is_cache_slot(t, P);
              const T* krow = cached ? key_cache + t * D : key + (t - P) * D;
              for (int64_t d = 0; d < D; ++d) {
                const float kd = tile::to_float(krow[d]);
                for (int64_t r = 0; r < RB; ++r) s[r * kTileKeys + lane] += qs[r * D + d] * kd;
              }
            }
            for (int64_t r = 0; r < rows; ++r) {  // online softmax
              const uint8_t* mask_row = a.tree_mask + (b * N + tile::row_token(r0 + r, N)) * N;
              float score[kTileKeys];
              float tile_max = -INFINITY;
              for (int lane = 0; lane < kTileKeys; ++lane) {
                const int64_t t = t0 + lane;
                const int64_t t_pos =
                    a.window > 0 && t < k_end ? tile::key_position(t, P, mask_b, N) : t;
                const bool visible =
                    t < k_end && tile::key_visible(t, P, mask_row) && t_pos >= lo[r];
                score[lane] = tile::masked_score(
                    tile::soft_cap(s[r * kTileKeys + lane], a.softcap), visible);
                tile_max = std::max(tile_max, score[lane]);  // warp_max
              }
              float alpha = 1.0f;
              for (int lane = 0; lane < kTileKeys; ++lane) {
                tile::RowSoftmax st{wm[r], wl[r * kTileKeys + lane]};
                alpha = tile::row_softmax_rescale(st, tile_max);
                const float weight = tile::row_softmax_weight(st, score[lane]);
                tile::row_softmax_add(st, weight);
                wl[r * kTileKeys + lane] = st.l;
                ps[r * kTileKeys + lane] = weight;
                if (lane == kTileKeys - 1) wm[r] = st.m;  // the same on every lane
              }
              for (int64_t d = 0; d < D; ++d) wacc[r * D + d] *= alpha;
            }
            for (int kk = 0; kk < kTileKeys; ++kk) {  // acc += p * V, lane = head dim
              const int64_t tk = t0 + kk;
              if (tk >= k_end) break;
              const T* vrow = tile::key_is_cache_slot(tk, P) ? value_cache + tk * D
                                                             : value + (tk - P) * D;
              for (int64_t r = 0; r < rows; ++r)
                for (int64_t d = 0; d < D; ++d)
                  wacc[r * D + d] += ps[r * kTileKeys + kk] * tile::to_float(vrow[d]);
            }
          }
        }

        for (int64_t r = 0; r < rows; ++r) {  // merge the warps
          float wsum[kWarps];
          float mx = -INFINITY;
          for (int w = 0; w < kWarps; ++w) {
            wsum[w] = 0.0f;
            for (int lane = 0; lane < kTileKeys; ++lane)
              wsum[w] += l[(w * RB + r) * kTileKeys + lane];  // warp_sum
            mx = std::max(mx, m[w * RB + r]);
          }
          const int64_t row = (b * Hq + tile::row_query_head(kvh, r0 + r, G, N)) * N +
                              tile::row_token(r0 + r, N);
          float total_l = 0.0f;
          for (int w = 0; w < kWarps; ++w)
            total_l += tile::merge_weight(m[w * RB + r], mx) * wsum[w];
          for (int64_t d = 0; d < D; ++d) {
            float x = 0.0f;
            for (int w = 0; w < kWarps; ++w)
              x += tile::merge_weight(m[w * RB + r], mx) * acc[(w * RB + r) * D + d];
            if (plan.splits == 1) {
              const float inv = tile::row_softmax_inv_sum(tile::RowSoftmax{mx, total_l});
              static_cast<T*>(a.output)[row * D + d] = tile::from_float<T>(x * inv);
            } else {
              float* part = partial.data() + (split * out_rows + row) * (D + 2);
              part[2 + d] = x;
              part[0] = mx;
              part[1] = total_l;
            }
          }
        }
      }

  if (plan.splits == 1) return;
  for (int64_t row = 0; row < out_rows; ++row) {  // combine_kernel
    const float* part0 = partial.data() + row * (D + 2);
    const int64_t stride = out_rows * (D + 2);
    float mx = -INFINITY;
    for (int64_t s = 0; s < plan.splits; ++s) mx = std::max(mx, part0[s * stride]);
    std::vector<float> weight(plan.splits);
    float total_l = 0.0f;
    for (int64_t s = 0; s < plan.splits; ++s) {
      weight[s] = tile::merge_weight(part0[s * stride], mx);
      total_l += weight[s] * part0[s * stride + 1];
    }
    const float inv = tile::row_softmax_inv_sum(tile::RowSoftmax{mx, total_l});
    for (int64_t d = 0; d < D; ++d) {
      float x = 0.0f;
      for (int64_t s = 0; s < plan.splits; ++s) x += weight[s] * part0[s * stride + 2 + d];
      static_cast<T*>(a.output)[row * D + d] = tile::from_float<T>(x * inv);
    }
  }
}

}  // namespace

void tree_attention_cuda_emulated(const TreeAttentionArgs& a, int num_sms) {
  if (a.dtype == DType::kFloat16)
    emulate<uint16_t>(a, num_sms);
  else
    emulate<float>(a, num_sms);
}

}  // namespace redrafter
