// redrafter::TreeAttention and redrafter::KVCommit, version 1 (docs/design.md §3.6, §4).
//
// Dimensions: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0, G = Hq / Hkv),
// N new (packed tree) tokens, D head dim, S cache capacity, P_b committed length of row b,
// K commit slots, Z flattened leading cache dims (e.g. layers x {key, value}).
//
// ---------------------------------------------------------------------------------------------
// TreeAttention
//   inputs  query        [B, Hq,  N, D]  T (float32 | float16), rotary already applied
//           key, value   [B, Hkv, N, D]  T, the N new tokens (rotary applied to key)
//           key_cache    [B, Hkv, S, D]  T
//           value_cache  [B, Hkv, S, D]  T
//           past_len     [B]             int64, 0 <= P_b and P_b + N <= S   (CPU memory in ORT)
//           tree_mask    [B, N, N]       bool, tree_mask[b, i, j]: new token i may attend new j
//   attr    scale        float; absent or 0 -> 1 / sqrt(D)
//           window       int >= 0; absent or 0 -> no sliding window
//           softcap      float >= 0; absent or 0 -> no soft-capping
//   outputs output           [B, Hq,  N, D]  T
//           key_cache_out    [B, Hkv, S, D]  T   key_cache with key written at slots [P_b, P_b+N)
//           value_cache_out  [B, Hkv, S, D]  T   likewise for value
//
//   for b, h, i:                                    # rows of B are independent (ragged P_b)
//     P   = past_len[b];  kvh = h / G               # grouped-query: no K/V repetition
//     depth(j) = count(tree_mask[b,j,:]) - 1        # new token j sits at position P + depth(j)
//     lo  = window > 0 ? P + depth(i) - window + 1 : -inf       # first position i may attend
//     vis = [(k_cache[b,kvh,t], v_cache[b,kvh,t]) for t in 0..P-1 if t >= lo]
//         + [(key[b,kvh,j],     value[b,kvh,j])   for j in 0..N-1
//                                                 if tree_mask[b,i,j] and P + depth(j) >= lo]
//     s_t = scale * dot(query[b,h,i], k_t)   for (k_t, v_t) in vis
//     s_t = softcap * tanh(s_t / softcap)    if softcap > 0      # Gemma 2
//     output[b,h,i] = sum_t softmax(s)_t * v_t  (accumulated in float32; 0 if vis is empty)
//   key_cache_out[b, :, P+j] = key[b, :, j];  value_cache_out[b, :, P+j] = value[b, :, j]
//   (all other slots equal the input caches)
//
// ---------------------------------------------------------------------------------------------
// TreeAttention version 2 (what ONNX bundles carry since version 2; docs/tree_attention.md):
// version 1 with the head split, the rotary and the head merge moved into the op, so a graph
// spends one node per layer on them instead of ~20 small ones.
//   inputs  query        [B, N, Hq * D]   T, before rotary (the q projection as it comes)
//           key, value   [B, N, Hkv * D]  T, key before rotary
//           key_cache, value_cache, past_len, tree_mask   as version 1
//           cos, sin     [B, N, D]        T, the rotary table of each new token's position
//   outputs output       [B, N, Hq * D]   T
//           key_cache_out, value_cache_out   as version 1 (the rotated keys are written)
//   D and Hkv come from key_cache, Hq = query width / D; D is even.
//   rot(x)[d] = x[d] * cos[d] + (d < D/2 ? -x[d + D/2] : x[d - D/2]) * sin[d]  (float, one
//   rounding to T); version 1 then runs on q = rot(query) and k = rot(key) split into heads
//   ([B, H, N, D]) and v = value split likewise, and its output is merged back.
//
// ---------------------------------------------------------------------------------------------
// KVCommit (the commit of §3.6: the n+1 accepted packed rows move to [P, P+n+1))
//   inputs  cache     [..., B, Hkv, S, D]  T; rank >= 4, leading dims flattened to Z: one stacked
//                     buffer [layers, 2, B, Hkv, S, D] commits every layer in one call; a
//                     per-layer [B, Hkv, S, D] buffer works the same
//           past_len  [B]     int64 (CPU memory in ORT)
//           source    [B, K]  int64, offsets from P_b; source[b, k] >= k for k < count[b]
//           count     [B]     int64, 0 <= count[b] <= K, P_b + source[b, k] < S
//   outputs cache_out [..., B, Hkv, S, D]  the cache after the move
//
//   for z, b, h:  for k in 0 .. count[b]-1 (increasing):
//     cache[z, b, h, P_b + k] = cache[z, b, h, P_b + source[b, k]]
//   Because source[b, k] >= k, an in-order move never overwrites a row it still has to read.
//
// ---------------------------------------------------------------------------------------------
// In place. Every cache output may share its input's buffer: the caller binds one OrtValue as
// both `key_cache` and `key_cache_out` through IO binding (docs/design.md §9) and ORT hands the kernel
// identical pointers. Then only the N new rows (or the K moved rows) are written. When the
// pointers differ, the kernel first copies the whole cache to the output (and the ORT kernels log
// a one-time warning). All reads of the cache happen inside these kernels.
//
// Limits: none on the CPU. CUDA: D <= 128, B <= 256, and for KVCommit B * K <= 2048 (past_len,
// source and count travel as kernel arguments); both return a clear error beyond them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "redrafter_ops.h"

namespace redrafter {

enum class DType : int { kFloat32 = RD_DTYPE_FLOAT32, kFloat16 = RD_DTYPE_FLOAT16 };

inline std::size_t dtype_size(DType t) { return t == DType::kFloat16 ? 2 : 4; }

struct TreeAttentionArgs {
  DType dtype;
  int64_t B, Hq, Hkv, N, D, S;
  float scale;                   // already resolved: never 0
  int64_t window = 0;            // sliding window W (0: none), see the pseudo-code above
  float softcap = 0.0f;          // score soft-capping (0: none)
  const void* query;             // [B, Hq, N, D]
  const void* key;               // [B, Hkv, N, D]
  const void* value;             // [B, Hkv, N, D]
  const void* key_cache;         // [B, Hkv, S, D]
  const void* value_cache;       // [B, Hkv, S, D]
  const int64_t* past_len;       // [B], host memory
  const uint8_t* tree_mask;      // [B, N, N], same memory as the tensors
  void* output;                  // [B, Hq, N, D]
  void* key_cache_out;           // [B, Hkv, S, D], may equal key_cache
  void* value_cache_out;         // [B, Hkv, S, D], may equal value_cache

  int64_t group() const { return Hq / Hkv; }
  std::size_t cache_bytes() const {
    return static_cast<std::size_t>(B * Hkv * S * D) * dtype_size(dtype);
  }
};

// Version 2's token-major tensors; the TreeAttentionArgs beside them give the shapes, caches,
// past_len and mask, and their query/key/value/output are scratch the implementation fills.
struct RotaryLayoutArgs {
  const void* query;  // [B, N, Hq * D], before rotary
  const void* key;    // [B, N, Hkv * D], before rotary
  const void* value;  // [B, N, Hkv * D]
  const void* cos;    // [B, N, D]
  const void* sin;    // [B, N, D]
  void* output;       // [B, N, Hq * D]
};

struct KVCommitArgs {
  DType dtype;
  int64_t Z, B, Hkv, S, D, K;
  const void* cache;             // [Z, B, Hkv, S, D]
  void* cache_out;               // [Z, B, Hkv, S, D], may equal cache
  const int64_t* past_len;       // [B], host memory
  const int64_t* source;         // [B, K], host memory
  const int64_t* count;          // [B], host memory

  std::size_t cache_bytes() const {
    return static_cast<std::size_t>(Z * B * Hkv * S * D) * dtype_size(dtype);
  }
};

// Boundary checks shared by the ORT kernels and the C ABI. They return "" when the arguments are
// valid, else a message naming the offending value. Shapes are checked by the callers (each
// knows its own tensors); these check dimensions and the host-side ranges.
std::string check_tree_attention(const TreeAttentionArgs& a);
std::string check_kv_commit(const KVCommitArgs& a);

// `scale` attribute: absent or 0 means 1 / sqrt(D).
float resolve_scale(float scale, int64_t D);

// Splits [0, total) into parallel work; the ORT CPU kernel runs it on the session's intra-op
// thread pool, the C ABI on std::threads.
struct ParallelRunner {
  virtual ~ParallelRunner() = default;
  // Calls fn(user, i) for every i in [0, total), possibly concurrently; returns when all are done.
  virtual void run(std::size_t total, void (*fn)(void*, std::size_t), void* user) const = 0;
  virtual int num_threads() const = 0;
};

struct ThreadRunner final : ParallelRunner {
  explicit ThreadRunner(int threads);  // threads <= 0: std::thread::hardware_concurrency()
  void run(std::size_t total, void (*fn)(void*, std::size_t), void* user) const override;
  int num_threads() const override { return threads_; }

 private:
  int threads_;
};

// CPU kernels (host pointers). Arguments must have passed the checks above.
void tree_attention_cpu(const TreeAttentionArgs& a, const ParallelRunner& runner);
void kv_commit_cpu(const KVCommitArgs& a);
// Version 2 on the CPU: the prologue into per-thread scratch, tree_attention_cpu, the epilogue.
void tree_attention_rotary_cpu(TreeAttentionArgs a, const RotaryLayoutArgs& r,
                               const ParallelRunner& runner);

// The CUDA kernel's algorithm, sequentially on the host (see rd_tree_attention_cuda_emulated).
void tree_attention_cuda_emulated(const TreeAttentionArgs& a, int num_sms);

#if defined(REDRAFTER_WITH_CUDA)
// CUDA kernels (device pointers; past_len, source, count on the host). They enqueue work on
// `stream` and return "" or the CUDA error of the launch.
std::string tree_attention_cuda(const TreeAttentionArgs& a, void* stream);
// Version 2: prologue and epilogue kernels around tree_attention_cuda, scratch from its pool.
std::string tree_attention_rotary_cuda(TreeAttentionArgs a, const RotaryLayoutArgs& r,
                                       void* stream);
std::string kv_commit_cuda(const KVCommitArgs& a, void* stream);
#endif

}  // namespace redrafter
