// TreeAttention version 2 on the CPU (tree_attention.h): the head split + rotary of query/key and
// the head split of value into head-major scratch, version 1's kernel on it, the head merge of
// its output. The prologue/epilogue touch N * (Hq + 2 Hkv) * D values: noise next to the
// attention itself, and far cheaper than the ~20 graph nodes per layer they replace.
#include <cstring>
#include <vector>

#include "tile_math.h"
#include "tree_attention.h"

namespace redrafter {
namespace {

// src [B, N, H * D] -> dst [B, H, N, D], rotated when cos is given.
template <typename T>
void to_heads(const T* src, T* dst, int64_t B, int64_t N, int64_t H, int64_t D, const T* cos,
              const T* sin) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      const int64_t token = b * N + i;
      const T* c = cos != nullptr ? cos + token * D : nullptr;
      const T* s = sin != nullptr ? sin + token * D : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        const T* row = src + (token * H + h) * D;
        T* out = dst + ((b * H + h) * N + i) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = tile::rotary_element(row, c, s, d, D);
      }
    }
}

// src [B, H, N, D] -> dst [B, N, H * D].
template <typename T>
void to_tokens(const T* src, T* dst, int64_t B, int64_t N, int64_t H, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i)
        std::memcpy(dst + ((b * N + i) * H + h) * D, src + ((b * H + h) * N + i) * D,
                    D * sizeof(T));
}

template <typename T>
void run(TreeAttentionArgs a, const RotaryLayoutArgs& r, const ParallelRunner& runner) {
  // Per calling thread: a session may run on several threads at once; the kernel's own workers
  // only read it while this thread waits in tree_attention_cpu.
  thread_local std::vector<T> scratch;
  const int64_t q_size = a.B * a.Hq * a.N * a.D, kv_size = a.B * a.Hkv * a.N * a.D;
  scratch.resize(static_cast<std::size_t>(2 * q_size + 2 * kv_size));
  T* q = scratch.data();
  T* k = q + q_size;
  T* v = k + kv_size;
  T* out = v + kv_size;
  const T* cos = static_cast<const T*>(r.cos);
  const T* sin = static_cast<const T*>(r.sin);
  to_heads(static_cast<const T*>(r.query), q, a.B, a.N, a.Hq, a.D, cos, sin);
  to_heads(static_cast<const T*>(r.key), k, a.B, a.N, a.Hkv, a.D, cos, sin);
  to_heads<T>(static_cast<const T*>(r.value), v, a.B, a.N, a.Hkv, a.D, nullptr, nullptr);
  a.query = q;
  a.key = k;
  a.value = v;
  a.output = out;
  tree_attention_cpu(a, runner);
  to_tokens(out, static_cast<T*>(r.output), a.B, a.N, a.Hq, a.D);
}

}  // namespace

void tree_attention_rotary_cpu(TreeAttentionArgs a, const RotaryLayoutArgs& r,
                               const ParallelRunner& runner) {
  if (a.dtype == DType::kFloat16)
    run<uint16_t>(a, r, runner);
  else
    run<float>(a, r, runner);
}

}  // namespace redrafter
