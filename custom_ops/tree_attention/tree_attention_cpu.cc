// TreeAttention on the CPU: boundary checks, the work plan, the cache writes, and the dispatch to
// the inner loops (cpu_tile_kernel.inc), compiled for x86-64-v2, AVX2+FMA+F16C and AVX-512.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <thread>
#include <type_traits>
#include <vector>

#include "tile_math.h"
#include "tree_attention.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's AVX-512 shuffle intrinsics pass _mm512_undefined_ps() as an unused merge source,
// which -W(maybe-)uninitialized reports: a false positive of the header (as in matmul_int4_cpu.cc).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define RD_HAVE_AVX2_CLONE 1
#else
#define RD_HAVE_AVX2_CLONE 0
#endif

namespace redrafter {

namespace {

// Work items: B x Hkv x row chunks (kItemRows of the G*N rows) x key splits. Keys are split only
// when there are too few items to keep every thread busy.
struct CpuPlan {
  int64_t row_chunks;
  int64_t splits;
  int64_t keys_per_split;
  int64_t items() const { return row_chunks * splits; }
};

}  // namespace

#define RD_CPU_NS cpu_base
#define RD_CPU_F16C 0
#define RD_CPU_KEYS 16
#define RD_CPU_VEC_BYTES 16
#include "cpu_tile_kernel.inc"
#undef RD_CPU_NS
#undef RD_CPU_F16C
#undef RD_CPU_KEYS
#undef RD_CPU_VEC_BYTES

#if RD_HAVE_AVX2_CLONE
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define RD_CPU_NS cpu_avx2
#define RD_CPU_F16C 1
#define RD_CPU_KEYS 16
#define RD_CPU_VEC_BYTES 32
#include "cpu_tile_kernel.inc"
#undef RD_CPU_NS
#undef RD_CPU_KEYS
#undef RD_CPU_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c,prefer-vector-width=512")
#define RD_CPU_NS cpu_avx512
#define RD_CPU_KEYS 64
#define RD_CPU_VEC_BYTES 64
#include "cpu_tile_kernel.inc"
#undef RD_CPU_NS
#undef RD_CPU_F16C
#undef RD_CPU_KEYS
#undef RD_CPU_VEC_BYTES
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kBase, kAvx2, kAvx512 };

// The best clone this CPU runs; REDRAFTER_CPU_ISA=base|avx2 caps it (tests cover every clone).
Isa cpu_isa() {
#if RD_HAVE_AVX2_CLONE
  static const Isa best = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kBase;
  }();
  const char* cap = std::getenv("REDRAFTER_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "base") == 0) return Isa::kBase;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
#else
  return Isa::kBase;
#endif
}

constexpr int64_t kItemRows = cpu_base::kItemRows;
constexpr int64_t kKeyTile = cpu_base::kKeyTile;
constexpr int64_t kKeysPerSplit = 512;  // a multiple of kKeyTile

// Key splits sit at fixed absolute positions (every kKeysPerSplit keys), never chosen from N, B
// or the thread count: a row's partial sums, and so its bits, must not depend on how many other
// rows share the call (batch invariance, see run_item). A split holding none of a row's keys
// merges in with weight 0 (exactly nothing), and one split alone merges to its own bits.
CpuPlan plan_cpu(const TreeAttentionArgs& a, int) {
  int64_t max_keys = 0;
  for (int64_t b = 0; b < a.B; ++b) max_keys = std::max(max_keys, a.past_len[b] + a.N);
  CpuPlan p;
  p.row_chunks = (a.group() * a.N + kItemRows - 1) / kItemRows;
  p.keys_per_split = kKeysPerSplit;
  p.splits = std::max<int64_t>(1, (max_keys + kKeysPerSplit - 1) / kKeysPerSplit);
  return p;
}

struct Job {
  const TreeAttentionArgs* a;
  CpuPlan plan;
  float* partial;
  Isa isa;
};

template <typename T>
void item_fn(void* user, std::size_t item) {
  const Job& job = *static_cast<const Job*>(user);
#if RD_HAVE_AVX2_CLONE
  if (job.isa == Isa::kAvx512)
    return cpu_avx512::run_item<T>(*job.a, job.plan, item, job.partial);
  if (job.isa == Isa::kAvx2) return cpu_avx2::run_item<T>(*job.a, job.plan, item, job.partial);
#endif
  cpu_base::run_item<T>(*job.a, job.plan, item, job.partial);
}

template <typename T>
void merge_fn(void* user, std::size_t row) {
  const Job& job = *static_cast<const Job*>(user);
  thread_local std::vector<float> acc;
  acc.resize(job.a->D);
#if RD_HAVE_AVX2_CLONE
  if (job.isa == Isa::kAvx512)
    return cpu_avx512::merge_row<T>(*job.a, job.plan, row, job.partial, acc.data());
  if (job.isa == Isa::kAvx2)
    return cpu_avx2::merge_row<T>(*job.a, job.plan, row, job.partial, acc.data());
#endif
  cpu_base::merge_row<T>(*job.a, job.plan, row, job.partial, acc.data());
}

// key_cache_out[b, :, P_b + j] = key[b, :, j] (after a full copy when not in place).
void write_new_rows(const void* cache_in, void* cache_out, const void* rows,
                    const TreeAttentionArgs& a) {
  const std::size_t es = dtype_size(a.dtype);
  if (cache_out != cache_in) std::memcpy(cache_out, cache_in, a.cache_bytes());
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.Hkv; ++h) {
      const int64_t head = b * a.Hkv + h;
      std::memcpy(static_cast<char*>(cache_out) + ((head * a.S + a.past_len[b]) * a.D) * es,
                  static_cast<const char*>(rows) + (head * a.N * a.D) * es, a.N * a.D * es);
    }
}

}  // namespace

ThreadRunner::ThreadRunner(int threads)
    : threads_(threads > 0 ? threads
                           : std::max(1, static_cast<int>(std::thread::hardware_concurrency()))) {}

void ThreadRunner::run(std::size_t total, void (*fn)(void*, std::size_t), void* user) const {
  const std::size_t workers = std::min<std::size_t>(total, static_cast<std::size_t>(threads_));
  if (workers <= 1) {
    for (std::size_t i = 0; i < total; ++i) fn(user, i);
    return;
  }
  std::atomic<std::size_t> next{0};
  auto worker = [&] {
    for (std::size_t i = next++; i < total; i = next++) fn(user, i);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t w = 1; w < workers; ++w) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

float resolve_scale(float scale, int64_t D) {
  return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(D));
}

std::string check_tree_attention(const TreeAttentionArgs& a) {
  std::ostringstream err;
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16) {
    err << "TreeAttention: element type " << static_cast<int>(a.dtype)
        << " is not supported; use float32 or float16";
  } else if (a.B < 1 || a.Hq < 1 || a.Hkv < 1 || a.N < 1 || a.D < 1 || a.S < 1) {
    err << "TreeAttention: every dimension must be >= 1, got B=" << a.B << " Hq=" << a.Hq
        << " Hkv=" << a.Hkv << " N=" << a.N << " D=" << a.D << " S=" << a.S;
  } else if (a.Hq % a.Hkv != 0) {
    err << "TreeAttention: query heads (" << a.Hq << ") must be a multiple of key/value heads ("
        << a.Hkv << ")";
  } else if (!std::isfinite(a.scale)) {
    err << "TreeAttention: scale must be finite, got " << a.scale;
  } else if (a.window < 0) {
    err << "TreeAttention: window must be >= 0 (0: no sliding window), got " << a.window;
  } else if (!std::isfinite(a.softcap) || a.softcap < 0.0f) {
    err << "TreeAttention: softcap must be a finite number >= 0 (0: none), got " << a.softcap;
  } else {
    for (int64_t b = 0; b < a.B; ++b) {
      const int64_t P = a.past_len[b];
      if (P < 0 || P + a.N > a.S) {
        err << "TreeAttention: past_len[" << b << "] = " << P << " with N = " << a.N
            << " new tokens does not fit the cache capacity S = " << a.S
            << " (need 0 <= past_len and past_len + N <= S)";
        break;
      }
    }
  }
  return err.str();
}

void tree_attention_cpu(const TreeAttentionArgs& a, const ParallelRunner& runner) {
  write_new_rows(a.key_cache, a.key_cache_out, a.key, a);
  write_new_rows(a.value_cache, a.value_cache_out, a.value, a);
  // Slots < P are the same in the input and output caches; read the input ones (when the cache is
  // shared they are the same memory, and the rows just written at >= P are read from key/value).
  Job job{&a, plan_cpu(a, runner.num_threads()), nullptr, cpu_isa()};
  std::vector<float> partial;
  if (job.plan.splits > 1) {
    partial.resize(job.plan.splits * a.B * a.Hq * a.N * (a.D + 2));
    job.partial = partial.data();
  }
  const std::size_t items = a.B * a.Hkv * job.plan.items();
  const bool f16 = a.dtype == DType::kFloat16;
  runner.run(items, f16 ? item_fn<uint16_t> : item_fn<float>, &job);
  if (job.plan.splits > 1)
    runner.run(a.B * a.Hq * a.N, f16 ? merge_fn<uint16_t> : merge_fn<float>, &job);
}

}  // namespace redrafter
