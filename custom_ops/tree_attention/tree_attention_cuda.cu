// TreeAttention and KVCommit on CUDA. Only launch geometry and memory staging live here; the math
// of a tile (online softmax, mask test, GQA mapping, fp16 conversion) is tile_math.h, which the CPU
// test suite checks through the host emulation (tree_attention_emulation.cc).
//
// TreeAttention, flash-decoding style:
//   grid  (splits, B*Hkv, row_chunks); block kWarps warps.
//   A block owns one KV head of one batch row, LaunchPlan::rows_per_block of its G*N query rows
//   (all query heads of the group: GQA without repeating K/V) and one split of the keys
//   [0, P_b+N). Its warps walk interleaved 32-key tiles of that split independently (no block
//   barrier per tile): each stages its tile's K and V rows (cache slots from the cache, new
//   tokens from key/value) into its own shared memory with 16-byte cp.async, scores them with
//   lane = key (the mask read straight from tree_mask), updates the online softmax (running max
//   warp-wide, running sum per lane until the end), then accumulates acc += p * V with lane =
//   head dim, for every row of the block. The warps' states merge in shared memory at the end.
//   Never materialises [B, H, N, P+N]. With more than one split, combine_kernel merges the
//   per-split partials.
//   The blocks of split 0 / chunk 0 also write the N new rows into the cache outputs (the reads
//   above touch only slots < P_b of the cache, so the write needs no ordering).
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "tile_math.h"
#include "tree_attention.h"

namespace redrafter {
namespace {

using tile::kMaxBatch;
using tile::kMaxHeadDim;
using tile::kTileKeys;
using tile::kWarps;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxCommitEntries = 2048;  // B * K of one KVCommit call (kernel argument)

struct AttentionParams {
  const void* query;
  const void* key;
  const void* value;
  const void* key_cache;
  const void* value_cache;
  const uint8_t* tree_mask;
  void* output;
  void* key_cache_out;
  void* value_cache_out;
  float* partial;  // [splits, B*Hq*N, D+2]: m, l, acc[D]; null when splits == 1
  int B, Hq, Hkv, N, D, S, group;
  float scale;
  float softcap;  // 0: none
  int window;     // 0: none
  int splits, keys_per_split;
  int vec;  // K rows may be read 16 bytes at a time (D and pointers aligned)
  int past[kMaxBatch];
};

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Eight consecutive elements as floats, in one 16-byte load (fp16) or two (fp32) when aligned.
__device__ __forceinline__ void load8(const float* src, bool vec, float* out) {
  if (vec) {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = src[i];
  }
}

__device__ __forceinline__ void load8(const uint16_t* src, bool vec, float* out) {
  if (vec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = tile::half_to_float(static_cast<uint16_t>(words[i] & 0xffffu));
      out[2 * i + 1] = tile::half_to_float(static_cast<uint16_t>(words[i] >> 16));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = tile::half_to_float(src[i]);
  }
}

// Bytes of one K row in a warp's shared tile: padded by 16 bytes so that lanes reading different
// rows (lane = key) at the same column hit different banks.
__host__ __device__ inline int k_row_bytes(int D, int elem) { return D * elem + 16; }

// A warp's staging area: K tile [kTileKeys][k_row_bytes], then V tile [kTileKeys][D] (raw T).
__host__ __device__ inline int warp_tile_bytes(int D, int elem) {
  return kTileKeys * (k_row_bytes(D, elem) + D * elem);
}

// Copies keys t0 .. t0+31 (those < k_end) of K and V into the warp's tile: 16-byte cp.async
// when aligned, else element by element. Rows < P come from the cache, the rest from key/value.
template <typename T>
__device__ __forceinline__ void stage_tile(char* tile, int t0, int k_end, int P, int D, bool vec,
                                           const T* key_cache, const T* key, const T* value_cache,
                                           const T* value, int lane) {
  const int kb = k_row_bytes(D, sizeof(T));
  char* vtile = tile + kTileKeys * kb;
  if (vec) {
    const int chunks = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per row
    for (int idx = lane; idx < kTileKeys * chunks; idx += 32) {
      const int j = idx / chunks, c = idx % chunks, t = t0 + j;
      if (t >= k_end) break;  // idx grows with j
      const bool cached = tile::key_is_cache_slot(t, P);
      const int64_t row = static_cast<int64_t>(cached ? t : t - P) * D;
      const char* ks = reinterpret_cast<const char*>((cached ? key_cache : key) + row) + c * 16;
      const char* vs = reinterpret_cast<const char*>((cached ? value_cache : value) + row) + c * 16;
      __pipeline_memcpy_async(tile + j * kb + c * 16, ks, 16);
      __pipeline_memcpy_async(vtile + (j * D) * sizeof(T) + c * 16, vs, 16);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
  } else {
    for (int idx = lane; idx < kTileKeys * D; idx += 32) {
      const int j = idx / D, d = idx % D, t = t0 + j;
      if (t >= k_end) break;
      const bool cached = tile::key_is_cache_slot(t, P);
      const int64_t off = static_cast<int64_t>(cached ? t : t - P) * D + d;
      reinterpret_cast<T*>(tile + j * kb)[d] = cached ? key_cache[off] : key[off];
      reinterpret_cast<T*>(vtile)[j * D + d] = cached ? value_cache[off] : value[off];
    }
  }
  __syncwarp();
}

// DPL: head dims per lane (ceil(D / 32)); RB: rows per block (tile::rows_per_block(D)). Each
// lane keeps RB softmax states and RB x DPL accumulators in registers.
template <typename T, int DPL, int RB>
__global__ void __launch_bounds__(kWarps * 32)
    tree_attention_kernel(const __grid_constant__ AttentionParams p) {
  extern __shared__ float4 smem4[];  // 16-byte aligned: vector loads and cp.async
  float* smem = reinterpret_cast<float*>(smem4);
  const int D = p.D, N = p.N, G = p.group;
  float* qs = smem;                               // [RB][D] queries, pre-scaled
  float* ps = qs + RB * D;                        // [kWarps][RB][kTileKeys] a tile's weights
  float* merge_m = ps + kWarps * RB * kTileKeys;  // [kWarps][RB]
  float* merge_l = merge_m + kWarps * RB;         // [kWarps][RB]
  char* tiles = reinterpret_cast<char*>(merge_l + kWarps * RB);  // [kWarps] staging areas
  float* merge_acc = reinterpret_cast<float*>(tiles);  // [kWarps][RB][D], after the key loop

  const int split = blockIdx.x;
  const int head = blockIdx.y;  // b * Hkv + kvh
  const int chunk = blockIdx.z;
  const int b = head / p.Hkv, kvh = head % p.Hkv;
  const int P = p.past[b];
  const int k_begin = split * p.keys_per_split;
  const int k_end = min(P + N, k_begin + p.keys_per_split);
  const int r0 = chunk * RB;
  const int rows = min(RB, G * N - r0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* query = static_cast<const T*>(p.query);
  const T* key = static_cast<const T*>(p.key) + static_cast<int64_t>(head) * N * D;
  const T* value = static_cast<const T*>(p.value) + static_cast<int64_t>(head) * N * D;
  const T* key_cache = static_cast<const T*>(p.key_cache) + static_cast<int64_t>(head) * p.S * D;
  const T* value_cache =
      static_cast<const T*>(p.value_cache) + static_cast<int64_t>(head) * p.S * D;

  if (split == 0 && chunk == 0) {
    T* kc = static_cast<T*>(p.key_cache_out) + (static_cast<int64_t>(head) * p.S + P) * D;
    T* vc = static_cast<T*>(p.value_cache_out) + (static_cast<int64_t>(head) * p.S + P) * D;
    for (int e = threadIdx.x; e < N * D; e += blockDim.x) {
      kc[e] = key[e];
      vc[e] = value[e];
    }
  }
  for (int e = threadIdx.x; e < RB * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    float q = 0.0f;
    if (r < rows) {
      const int64_t h = tile::row_query_head(kvh, r0 + r, G, N), i = tile::row_token(r0 + r, N);
      q = tile::to_float(query[((b * p.Hq + h) * N + i) * D + d]) * p.scale;
    }
    qs[e] = q;
  }
  __syncthreads();

  // Sliding window: the first position each row attends (tile_math.h), and where the warps'
  // walk may start (strides before every row's window are skipped).
  const uint8_t* mask_b = p.tree_mask + static_cast<int64_t>(b) * N * N;
  int64_t lo[RB];
  int64_t lo_min = P;  // never past P (tile_math.h: first_walk_key)
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    lo[r] = INT64_MIN;
    if (p.window > 0 && r < rows) {
      const int64_t i = tile::row_token(r0 + r, N);
      lo[r] = tile::window_start(P + tile::new_token_depth(mask_b + i * N, N), p.window);
    }
    lo_min = min(lo_min, lo[r]);
  }
  const int walk_begin =
      p.window > 0 ? static_cast<int>(tile::first_walk_key(k_begin, lo_min, kWarps * kTileKeys))
                   : k_begin;

  tile::RowSoftmax st[RB];  // m warp-uniform; l per lane until the end
  float acc[RB][DPL];
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    st[r] = tile::row_softmax_init();
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[r][c] = 0.0f;
  }
  const bool vec = p.vec != 0;
  const int d_vec = D / 8 * 8;
  float* my_ps = ps + warp * RB * kTileKeys;
  char* my_tile = tiles + warp * warp_tile_bytes(D, sizeof(T));
  const T* ktile = reinterpret_cast<const T*>(my_tile);
  const T* vtile = reinterpret_cast<const T*>(my_tile + kTileKeys * k_row_bytes(D, sizeof(T)));
  const int k_stride = k_row_bytes(D, sizeof(T)) / static_cast<int>(sizeof(T));

  for (int t0 = walk_begin + warp * kTileKeys; t0 < k_end; t0 += kWarps * kTileKeys) {
    stage_tile(my_tile, t0, k_end, P, D, vec, key_cache, key, value_cache, value, lane);

    // Scores, lane = key t.
    const int t = t0 + lane;
    float s[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) s[r] = 0.0f;
    const T* krow = ktile + lane * k_stride;
    for (int d0 = 0; d0 < d_vec; d0 += 8) {
      float kv[8];
      load8(krow + d0, vec, kv);
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        float q[8];
        load8(qs + r * D + d0, vec, q);
#pragma unroll
        for (int i = 0; i < 8; ++i) s[r] += q[i] * kv[i];
      }
    }
    for (int d = d_vec; d < D; ++d) {
      const float kd = tile::to_float(krow[d]);
#pragma unroll
      for (int r = 0; r < RB; ++r) s[r] += qs[r * D + d] * kd;
    }

    // Online softmax: running max across the warp, weights to shared memory for the PV pass.
    // Every row of RB is processed (no early exit, so the compiler interleaves the rows'
    // shuffles); rows past `rows` see no key, their weights are 0.
    const int64_t t_pos = p.window > 0 && t < k_end ? tile::key_position(t, P, mask_b, N) : t;
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const uint8_t* mask_row = mask_b + static_cast<int64_t>(tile::row_token(r0 + r, N)) * N;
      const bool visible =
          r < rows && t < k_end && tile::key_visible(t, P, mask_row) && t_pos >= lo[r];
      const float score = tile::masked_score(tile::soft_cap(s[r], p.softcap), visible);
      const float alpha = tile::row_softmax_rescale(st[r], warp_max(score));
      const float w = tile::row_softmax_weight(st[r], score);
      tile::row_softmax_add(st[r], w);
#pragma unroll
      for (int c = 0; c < DPL; ++c) acc[r][c] *= alpha;
      my_ps[r * kTileKeys + lane] = w;
    }
    __syncwarp();

    // acc += p * V, lane = head dim; four keys' weights per shared-memory load. Keys past k_end
    // have weight 0 but unstaged V rows, so the tail of the last tile goes one key at a time.
    const int nk = min(kTileKeys, k_end - t0);
    int kk = 0;
    for (; kk + 4 <= nk; kk += 4) {
      float v[4][DPL];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
          const int d = lane + 32 * c;
          v[j][c] = d < D ? tile::to_float(vtile[(kk + j) * D + d]) : 0.0f;
        }
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const float4 pk = *reinterpret_cast<const float4*>(my_ps + r * kTileKeys + kk);
#pragma unroll
        for (int c = 0; c < DPL; ++c)
          acc[r][c] += pk.x * v[0][c] + pk.y * v[1][c] + pk.z * v[2][c] + pk.w * v[3][c];
      }
    }
    for (; kk < nk; ++kk) {
      float v[DPL];
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        v[c] = d < D ? tile::to_float(vtile[kk * D + d]) : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const float pk = my_ps[r * kTileKeys + kk];
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] += pk * v[c];
      }
    }
    __syncwarp();  // the tile and weights are consumed before the next tile overwrites them
  }
  __syncthreads();  // every warp is done with its staging area: merge_acc reuses it

  // Merge the warps: each leaves (m, l, acc) per row in shared memory.
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    if (r >= rows) break;
    const float l = warp_sum(st[r].l);
    if (lane == 0) {
      merge_m[warp * RB + r] = st[r].m;
      merge_l[warp * RB + r] = l;
    }
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < D) merge_acc[(warp * RB + r) * D + d] = acc[r][c];
    }
  }
  __syncthreads();
  const int64_t out_rows = static_cast<int64_t>(p.B) * p.Hq * N;
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, merge_m[w * RB + r]);
    float l = 0.0f, a = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = tile::merge_weight(merge_m[w * RB + r], m);
      l += weight * merge_l[w * RB + r];
      a += weight * merge_acc[(w * RB + r) * D + d];
    }
    const int64_t row =
        (static_cast<int64_t>(b) * p.Hq + tile::row_query_head(kvh, r0 + r, G, N)) * N +
        tile::row_token(r0 + r, N);
    if (p.splits == 1) {
      const tile::RowSoftmax total{m, l};
      static_cast<T*>(p.output)[row * D + d] =
          tile::from_float<T>(a * tile::row_softmax_inv_sum(total));
    } else {
      float* part = p.partial + (split * out_rows + row) * (D + 2);
      part[2 + d] = a;
      if (d == 0) {
        part[0] = m;
        part[1] = l;
      }
    }
  }
}

// One block per output row: merge the splits' (m, l, acc) with tile::merge_weight. Weights are
// computed once per split into shared memory, then every head dim sums over the splits.
template <typename T>
__global__ void __launch_bounds__(128)
    combine_kernel(const float* partial, T* output, int64_t rows, int D, int splits) {
  extern __shared__ float weight[];  // [splits]
  __shared__ float reduce[128 / 32];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* part0 = partial + row * (D + 2);
  const int64_t stride = rows * (D + 2);

  float m = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) m = fmaxf(m, part0[s * stride]);
  m = warp_max(m);
  if (lane == 0) reduce[warp] = m;
  __syncthreads();
  m = fmaxf(fmaxf(reduce[0], reduce[1]), fmaxf(reduce[2], reduce[3]));
  __syncthreads();

  float l = 0.0f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float w = tile::merge_weight(part0[s * stride], m);
    weight[s] = w;
    l += w * part0[s * stride + 1];
  }
  l = warp_sum(l);
  if (lane == 0) reduce[warp] = l;
  __syncthreads();
  l = reduce[0] + reduce[1] + reduce[2] + reduce[3];
  const float inv = tile::row_softmax_inv_sum(tile::RowSoftmax{m, l});
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) acc += weight[s] * part0[s * stride + 2 + d];
    output[row * D + d] = tile::from_float<T>(acc * inv);
  }
}

struct CommitParams {
  void* cache;  // [Z, B, Hkv, S, D]
  int B, Hkv, S, D, K;
  int past[kMaxBatch];
  int count[kMaxBatch];
  int source[kMaxCommitEntries];  // [B, K]
};

// One block per (z, b, h); thread d moves element d of every row, in increasing k, so the
// in-order semantics hold per element without any barrier.
template <typename T>
__global__ void kv_commit_kernel(const __grid_constant__ CommitParams p) {
  const int64_t zbh = blockIdx.x;
  const int b = static_cast<int>((zbh / p.Hkv) % p.B);
  T* head = static_cast<T*>(p.cache) + zbh * p.S * p.D + static_cast<int64_t>(p.past[b]) * p.D;
  for (int k = 0; k < p.count[b]; ++k) {
    const int src = p.source[b * p.K + k];
    if (src == k) continue;
    for (int d = threadIdx.x; d < p.D; d += blockDim.x)
      head[static_cast<int64_t>(k) * p.D + d] = head[static_cast<int64_t>(src) * p.D + d];
  }
}

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("redrafter CUDA ") + what + ": " + cudaGetErrorName(e) + ": " +
         cudaGetErrorString(e);
}

#define RD_CUDA_RETURN_IF_ERROR(what, expr)                       \
  do {                                                            \
    const cudaError_t rd_err_ = (expr);                           \
    if (rd_err_ != cudaSuccess) return cuda_error(what, rd_err_); \
  } while (0)

// Per-device memory pool for the split partials; its release threshold keeps freed blocks cached
// across calls, so a decode step allocates nothing from the driver.
std::string scratch_pool(cudaMemPool_t* pool, int* num_sms) {
  static std::mutex mu;
  static std::map<int, std::pair<cudaMemPool_t, int>> pools;
  int device = 0;
  RD_CUDA_RETURN_IF_ERROR("cudaGetDevice", cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools.find(device);
  if (it == pools.end()) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t created;
    RD_CUDA_RETURN_IF_ERROR("cudaMemPoolCreate", cudaMemPoolCreate(&created, &props));
    uint64_t keep = UINT64_MAX;
    RD_CUDA_RETURN_IF_ERROR(
        "cudaMemPoolSetAttribute",
        cudaMemPoolSetAttribute(created, cudaMemPoolAttrReleaseThreshold, &keep));
    int sms = 0;
    RD_CUDA_RETURN_IF_ERROR(
        "cudaDeviceGetAttribute",
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = pools.emplace(device, std::make_pair(created, sms)).first;
  }
  *pool = it->second.first;
  *num_sms = it->second.second;
  return "";
}

template <typename T, int DPL, int RB>
std::string launch_attention(const AttentionParams& p, const tile::LaunchPlan& plan,
                             cudaStream_t stream) {
  const size_t staging = std::max<size_t>(kWarps * warp_tile_bytes(p.D, sizeof(T)),
                                          sizeof(float) * kWarps * RB * p.D);  // or merge_acc
  const size_t smem =
      sizeof(float) * (RB * p.D + kWarps * RB * kTileKeys + 2 * kWarps * RB) + staging;
  auto kernel = tree_attention_kernel<T, DPL, RB>;
  if (smem > 48 * 1024) {
    RD_CUDA_RETURN_IF_ERROR(
        "cudaFuncSetAttribute",
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(p.B * p.Hkv),
                  static_cast<unsigned>(plan.row_chunks));
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  RD_CUDA_RETURN_IF_ERROR("tree_attention_kernel launch", cudaGetLastError());
  if (plan.splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.N;
    combine_kernel<T><<<static_cast<unsigned>(rows), 128, sizeof(float) * p.splits, stream>>>(
        p.partial, static_cast<T*>(p.output), rows, p.D, p.splits);
    RD_CUDA_RETURN_IF_ERROR("combine_kernel launch", cudaGetLastError());
  }
  return "";
}

// DPL (head dims per lane) and RB (rows per block) as compile-time constants.
template <typename T>
std::string dispatch_head_dim(const AttentionParams& p, const tile::LaunchPlan& plan,
                              cudaStream_t stream) {
  const bool few = plan.rows_per_block == tile::kFewRowsPerBlock;
  constexpr int kFew = tile::kFewRowsPerBlock;
  if (p.D <= 32)
    return few ? launch_attention<T, 1, kFew>(p, plan, stream)
               : launch_attention<T, 1, 16>(p, plan, stream);
  if (p.D <= 64)
    return few ? launch_attention<T, 2, kFew>(p, plan, stream)
               : launch_attention<T, 2, 16>(p, plan, stream);
  return few ? launch_attention<T, 4, kFew>(p, plan, stream)
             : launch_attention<T, 4, 8>(p, plan, stream);
}

}  // namespace

std::string tree_attention_cuda(const TreeAttentionArgs& a, void* stream_ptr) {
  if (a.B > kMaxBatch)
    return "TreeAttention (CUDA): batch " + std::to_string(a.B) + " exceeds the kernel's limit of " +
           std::to_string(kMaxBatch);
  if (a.D > kMaxHeadDim)
    return "TreeAttention (CUDA): head dim " + std::to_string(a.D) + " exceeds " +
           std::to_string(kMaxHeadDim);
  if (a.Hq * a.N > (int64_t{1} << 24) || a.S * a.D > (int64_t{1} << 30))
    return "TreeAttention (CUDA): tensor too large for 32-bit row indexing";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

  cudaMemPool_t pool;
  int num_sms = 0;
  std::string err = scratch_pool(&pool, &num_sms);
  if (!err.empty()) return err;

  const size_t bytes = a.cache_bytes();
  if (a.key_cache_out != a.key_cache)
    RD_CUDA_RETURN_IF_ERROR("cudaMemcpyAsync", cudaMemcpyAsync(a.key_cache_out, a.key_cache, bytes,
                                                               cudaMemcpyDeviceToDevice, stream));
  if (a.value_cache_out != a.value_cache)
    RD_CUDA_RETURN_IF_ERROR("cudaMemcpyAsync",
                            cudaMemcpyAsync(a.value_cache_out, a.value_cache, bytes,
                                            cudaMemcpyDeviceToDevice, stream));

  AttentionParams p = {};
  p.query = a.query;
  p.key = a.key;
  p.value = a.value;
  p.key_cache = a.key_cache;
  p.value_cache = a.value_cache;
  p.tree_mask = a.tree_mask;
  p.output = a.output;
  p.key_cache_out = a.key_cache_out;
  p.value_cache_out = a.value_cache_out;
  p.B = static_cast<int>(a.B);
  p.Hq = static_cast<int>(a.Hq);
  p.Hkv = static_cast<int>(a.Hkv);
  p.N = static_cast<int>(a.N);
  p.D = static_cast<int>(a.D);
  p.S = static_cast<int>(a.S);
  p.group = static_cast<int>(a.group());
  p.scale = a.scale;
  p.softcap = a.softcap;
  p.window = static_cast<int>(std::min<int64_t>(a.window, INT32_MAX));
  int64_t max_keys = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    p.past[b] = static_cast<int>(a.past_len[b]);
    max_keys = std::max<int64_t>(max_keys, a.past_len[b] + a.N);
  }
  const tile::LaunchPlan plan =
      tile::plan_launch(a.B, a.Hkv, a.group(), a.N, a.D, max_keys, num_sms);
  p.splits = static_cast<int>(plan.splits);
  p.keys_per_split = static_cast<int>(plan.keys_per_split);
  const std::uintptr_t align = reinterpret_cast<std::uintptr_t>(a.key) |
                               reinterpret_cast<std::uintptr_t>(a.key_cache) |
                               reinterpret_cast<std::uintptr_t>(a.value) |
                               reinterpret_cast<std::uintptr_t>(a.value_cache);
  p.vec = a.D % 8 == 0 && align % 16 == 0;

  if (plan.splits > 1) {
    const size_t partial_bytes = sizeof(float) * plan.splits * a.B * a.Hq * a.N * (a.D + 2);
    RD_CUDA_RETURN_IF_ERROR("cudaMallocFromPoolAsync",
                            cudaMallocFromPoolAsync(reinterpret_cast<void**>(&p.partial),
                                                    partial_bytes, pool, stream));
  }
  err = a.dtype == DType::kFloat16 ? dispatch_head_dim<uint16_t>(p, plan, stream)
                                   : dispatch_head_dim<float>(p, plan, stream);
  if (p.partial != nullptr) {
    const cudaError_t e = cudaFreeAsync(p.partial, stream);
    if (err.empty() && e != cudaSuccess) err = cuda_error("cudaFreeAsync", e);
  }
  return err;
}

namespace {

// Version 2's prologue: src [B, N, H * D] -> dst [B, H, N, D], rotated when cos is given. One
// thread per output element (grid-stride).
template <typename T>
__global__ void to_heads_kernel(const T* src, T* dst, int64_t N, int64_t H, int64_t D,
                                int64_t total, const T* cos, const T* sin) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % D, i = e / D % N, h = e / (D * N) % H, b = e / (D * N * H);
    const int64_t token = b * N + i;
    dst[e] = tile::rotary_element(src + (token * H + h) * D,
                                  cos != nullptr ? cos + token * D : nullptr,
                                  sin != nullptr ? sin + token * D : nullptr, d, D);
  }
}

// Version 2's epilogue: src [B, H, N, D] -> dst [B, N, H * D].
template <typename T>
__global__ void to_tokens_kernel(const T* src, T* dst, int64_t N, int64_t H, int64_t D,
                                 int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % D, h = e / D % H, i = e / (D * H) % N, b = e / (D * H * N);
    dst[e] = src[((b * H + h) * N + i) * D + d];
  }
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
}

template <typename T>
std::string rotary_layout(TreeAttentionArgs a, const RotaryLayoutArgs& r, cudaStream_t stream) {
  cudaMemPool_t pool;
  int num_sms = 0;
  std::string err = scratch_pool(&pool, &num_sms);
  if (!err.empty()) return err;
  const int64_t q_size = a.B * a.Hq * a.N * a.D, kv_size = a.B * a.Hkv * a.N * a.D;
  if (q_size == 0) return tree_attention_cuda(a, stream);  // nothing to lay out
  T* scratch = nullptr;
  RD_CUDA_RETURN_IF_ERROR(
      "cudaMallocFromPoolAsync",
      cudaMallocFromPoolAsync(reinterpret_cast<void**>(&scratch),
                              sizeof(T) * static_cast<size_t>(2 * q_size + 2 * kv_size), pool,
                              stream));
  T* q = scratch;
  T* k = q + q_size;
  T* v = k + kv_size;
  T* out = v + kv_size;
  const T* cos = static_cast<const T*>(r.cos);
  const T* sin = static_cast<const T*>(r.sin);
  to_heads_kernel<T><<<grid_for(q_size), 256, 0, stream>>>(static_cast<const T*>(r.query), q,
                                                           a.N, a.Hq, a.D, q_size, cos, sin);
  to_heads_kernel<T><<<grid_for(kv_size), 256, 0, stream>>>(static_cast<const T*>(r.key), k,
                                                            a.N, a.Hkv, a.D, kv_size, cos, sin);
  to_heads_kernel<T><<<grid_for(kv_size), 256, 0, stream>>>(
      static_cast<const T*>(r.value), v, a.N, a.Hkv, a.D, kv_size, nullptr, nullptr);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) err = cuda_error("to_heads_kernel launch", e);
  if (err.empty()) {
    a.query = q;
    a.key = k;
    a.value = v;
    a.output = out;
    err = tree_attention_cuda(a, stream);
  }
  if (err.empty()) {
    to_tokens_kernel<T><<<grid_for(q_size), 256, 0, stream>>>(out, static_cast<T*>(r.output), a.N,
                                                              a.Hq, a.D, q_size);
    e = cudaGetLastError();
    if (e != cudaSuccess) err = cuda_error("to_tokens_kernel launch", e);
  }
  e = cudaFreeAsync(scratch, stream);
  if (err.empty() && e != cudaSuccess) err = cuda_error("cudaFreeAsync", e);
  return err;
}

}  // namespace

std::string tree_attention_rotary_cuda(TreeAttentionArgs a, const RotaryLayoutArgs& r,
                                       void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  return a.dtype == DType::kFloat16 ? rotary_layout<uint16_t>(a, r, stream)
                                    : rotary_layout<float>(a, r, stream);
}

std::string kv_commit_cuda(const KVCommitArgs& a, void* stream_ptr) {
  if (a.B > kMaxBatch || a.B * a.K > kMaxCommitEntries)
    return "KVCommit (CUDA): batch " + std::to_string(a.B) + " x slots " + std::to_string(a.K) +
           " exceeds the kernel's limits (batch <= " + std::to_string(kMaxBatch) +
           ", batch * slots <= " + std::to_string(kMaxCommitEntries) + ")";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.cache_out != a.cache)
    RD_CUDA_RETURN_IF_ERROR("cudaMemcpyAsync",
                            cudaMemcpyAsync(a.cache_out, a.cache, a.cache_bytes(),
                                            cudaMemcpyDeviceToDevice, stream));
  CommitParams p = {};
  p.cache = a.cache_out;
  p.B = static_cast<int>(a.B);
  p.Hkv = static_cast<int>(a.Hkv);
  p.S = static_cast<int>(a.S);
  p.D = static_cast<int>(a.D);
  p.K = static_cast<int>(a.K);
  int64_t moves = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    p.past[b] = static_cast<int>(a.past_len[b]);
    p.count[b] = static_cast<int>(a.count[b]);
    for (int64_t k = 0; k < a.K; ++k) {
      p.source[b * a.K + k] = static_cast<int>(a.source[b * a.K + k]);
      moves += k < a.count[b] && a.source[b * a.K + k] != k;
    }
  }
  if (moves == 0) return "";
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(128, (a.D + 31) / 32 * 32));
  const unsigned blocks = static_cast<unsigned>(a.Z * a.B * a.Hkv);
  if (a.dtype == DType::kFloat16)
    kv_commit_kernel<uint16_t><<<blocks, threads, 0, stream>>>(p);
  else
    kv_commit_kernel<float><<<blocks, threads, 0, stream>>>(p);
  RD_CUDA_RETURN_IF_ERROR("kv_commit_kernel launch", cudaGetLastError());
  return "";
}

}  // namespace redrafter
