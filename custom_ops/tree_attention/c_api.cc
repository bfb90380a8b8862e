// The C ABI of redrafter_ops.h: the kernels on raw pointers, for tests and benchmarks (ctypes),
// with the same boundary checks as the ORT kernels.
#include <exception>
#include <string>

#include "tree_attention.h"

namespace {

thread_local std::string last_error;

int fail(std::string message) {
  last_error = std::move(message);
  return 1;
}

redrafter::TreeAttentionArgs make_args(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t N,
                                       int64_t D, int64_t S, float scale, int64_t window,
                                       float softcap, const void* query, const void* key,
                                       const void* value, const void* key_cache,
                                       const void* value_cache, const int64_t* past_len,
                                       const uint8_t* tree_mask, void* output,
                                       void* key_cache_out, void* value_cache_out) {
  redrafter::TreeAttentionArgs a;
  a.dtype = static_cast<redrafter::DType>(dtype);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.N = N;
  a.D = D;
  a.S = S;
  a.scale = redrafter::resolve_scale(scale, D > 0 ? D : 1);
  a.window = window;
  a.softcap = softcap;
  a.query = query;
  a.key = key;
  a.value = value;
  a.key_cache = key_cache;
  a.value_cache = value_cache;
  a.past_len = past_len;
  a.tree_mask = tree_mask;
  a.output = output;
  a.key_cache_out = key_cache_out;
  a.value_cache_out = value_cache_out;
  return a;
}

redrafter::KVCommitArgs make_commit(int dtype, int64_t Z, int64_t B, int64_t Hkv, int64_t S,
                                    int64_t D, int64_t K, const void* cache, void* cache_out,
                                    const int64_t* past_len, const int64_t* source,
                                    const int64_t* count) {
  redrafter::KVCommitArgs a;
  a.dtype = static_cast<redrafter::DType>(dtype);
  a.Z = Z;
  a.B = B;
  a.Hkv = Hkv;
  a.S = S;
  a.D = D;
  a.K = K;
  a.cache = cache;
  a.cache_out = cache_out;
  a.past_len = past_len;
  a.source = source;
  a.count = count;
  return a;
}

// Runs body() if the arguments pass `check`, turning exceptions into an error code.
template <typename Args, typename Check, typename Body>
int guarded(const Args& a, Check check, Body body) {
  try {
    std::string err = check(a);
    if (!err.empty()) return fail(err);
    err = body();
    if (!err.empty()) return fail(err);
    last_error.clear();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

}  // namespace

#define RD_ATTENTION_PARAMS                                                                   \
  int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t D, int64_t S, float scale, \
      int64_t window, float softcap, const void *query, const void *key, const void *value,   \
      const void *key_cache, const void *value_cache, const int64_t *past_len,                \
      const uint8_t *tree_mask, void *output, void *key_cache_out, void *value_cache_out
#define RD_ATTENTION_ARGS                                                                      \
  make_args(dtype, B, Hq, Hkv, N, D, S, scale, window, softcap, query, key, value, key_cache,  \
            value_cache, past_len, tree_mask, output, key_cache_out, value_cache_out)

extern "C" {

const char* rd_last_error(void) { return last_error.c_str(); }

int rd_matmul_int4_max_outputs(void) { return REDRAFTER_MATMUL_INT4_MAX_OUTPUTS; }

int rd_matmul_int4_max_inputs(void) { return REDRAFTER_MATMUL_INT4_MAX_INPUTS; }

int rd_has_cuda_kernels(void) {
#if defined(REDRAFTER_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}

int rd_tree_attention_cpu(RD_ATTENTION_PARAMS, int num_threads) {
  const redrafter::TreeAttentionArgs a = RD_ATTENTION_ARGS;
  return guarded(a, redrafter::check_tree_attention, [&] {
    redrafter::tree_attention_cpu(a, redrafter::ThreadRunner(num_threads));
    return std::string();
  });
}

int rd_tree_attention_cuda_emulated(RD_ATTENTION_PARAMS, int num_sms) {
  const redrafter::TreeAttentionArgs a = RD_ATTENTION_ARGS;
  return guarded(a, redrafter::check_tree_attention, [&] {
    redrafter::tree_attention_cuda_emulated(a, num_sms);
    return std::string();
  });
}

int rd_tree_attention_cuda(RD_ATTENTION_PARAMS, void* stream) {
  const redrafter::TreeAttentionArgs a = RD_ATTENTION_ARGS;
#if defined(REDRAFTER_WITH_CUDA)
  return guarded(a, redrafter::check_tree_attention,
                 [&] { return redrafter::tree_attention_cuda(a, stream); });
#else
  (void)a;
  (void)stream;
  return fail("this redrafter ops library was built without CUDA (no nvcc at build time)");
#endif
}

int rd_tree_attention_rotary_cuda(RD_ATTENTION_PARAMS, const void* cos, const void* sin,
                                  void* stream) {
  const redrafter::TreeAttentionArgs a = RD_ATTENTION_ARGS;
  const auto check = [](const redrafter::TreeAttentionArgs& args) {
    return args.D % 2 != 0 ? "TreeAttention version 2: head dim " + std::to_string(args.D) +
                                 " must be even (rotate_half)"
                           : redrafter::check_tree_attention(args);
  };
#if defined(REDRAFTER_WITH_CUDA)
  const redrafter::RotaryLayoutArgs r{query, key, value, cos, sin, output};
  return guarded(a, check, [&] { return redrafter::tree_attention_rotary_cuda(a, r, stream); });
#else
  (void)a;
  (void)check;
  (void)cos;
  (void)sin;
  (void)stream;
  return fail("this redrafter ops library was built without CUDA (no nvcc at build time)");
#endif
}

int rd_kv_commit_cpu(int dtype, int64_t Z, int64_t B, int64_t Hkv, int64_t S, int64_t D,
                     int64_t K, const void* cache, void* cache_out, const int64_t* past_len,
                     const int64_t* source, const int64_t* count) {
  const redrafter::KVCommitArgs a =
      make_commit(dtype, Z, B, Hkv, S, D, K, cache, cache_out, past_len, source, count);
  return guarded(a, redrafter::check_kv_commit, [&] {
    redrafter::kv_commit_cpu(a);
    return std::string();
  });
}

int rd_kv_commit_cuda(int dtype, int64_t Z, int64_t B, int64_t Hkv, int64_t S, int64_t D,
                      int64_t K, const void* cache, void* cache_out, const int64_t* past_len,
                      const int64_t* source, const int64_t* count, void* stream) {
  const redrafter::KVCommitArgs a =
      make_commit(dtype, Z, B, Hkv, S, D, K, cache, cache_out, past_len, source, count);
#if defined(REDRAFTER_WITH_CUDA)
  return guarded(a, redrafter::check_kv_commit,
                 [&] { return redrafter::kv_commit_cuda(a, stream); });
#else
  (void)a;
  (void)stream;
  return fail("this redrafter ops library was built without CUDA (no nvcc at build time)");
#endif
}

}  // extern "C"
