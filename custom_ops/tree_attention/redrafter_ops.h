// The native op library's public face: the op identity (defined here once; redrafter/ops.py
// mirrors it and tests/test_native_ops.py checks that the two agree) and the C ABI that tests and
// benchmarks call through ctypes without ONNX Runtime.
//
// Semantics and shapes of both ops: tree_attention.h.
#pragma once

#include <stdint.h>

#define REDRAFTER_OP_DOMAIN "redrafter"
#define REDRAFTER_TREE_ATTENTION_OP "TreeAttention"
#define REDRAFTER_KV_COMMIT_OP "KVCommit"
#define REDRAFTER_MATMUL_INT4_OP "MatMulInt4"  // MatMulNBits (bits 4) swapped in on the CPU
#define REDRAFTER_MATMUL_INT4_MAX_OUTPUTS 4
// MatMulNBits' 6 inputs, then `residual` (added to Y) and `gate` (multiplies A): matmul_int4.h
#define REDRAFTER_MATMUL_INT4_MAX_INPUTS 8
#define REDRAFTER_OP_VERSION 2  // the newest TreeAttention version implemented (1 and 2 are)

// Element types, numbered as ONNX's TensorProto.DataType.
#define RD_DTYPE_FLOAT32 1
#define RD_DTYPE_FLOAT16 10

#if defined(__GNUC__)
#define RD_EXPORT __attribute__((visibility("default")))
#else
#define RD_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Every rd_* function returns 0 on success; otherwise non-zero, and rd_last_error() (per thread)
// says what was wrong. Shapes, dtypes and ranges are validated as the ORT kernels validate them.

RD_EXPORT const char* rd_last_error(void);
RD_EXPORT int rd_has_cuda_kernels(void);  // 1 when the library was built with nvcc
// The most outputs one MatMulInt4 node may have: with the `split` attribute (ints), its output
// columns go to that many outputs of those widths, as a Split of the last axis would send them.
// (Absent from builds before the attribute existed: those take one output.)
RD_EXPORT int rd_matmul_int4_max_outputs(void);
// The most inputs a MatMulInt4 node may have: 8 when it takes `residual` (input 6: Y + residual,
// a residual Add folded in) and `gate` (input 7: A * gate before the product, a SwiGLU's Mul
// folded in). (Absent from builds before those inputs existed: those take MatMulNBits' 6.)
RD_EXPORT int rd_matmul_int4_max_inputs(void);

// The attention functions take the op's attributes as arguments: scale (0: 1/sqrt(D)), window
// (0: none) and softcap (0: none); tree_attention.h states their semantics.
//
// TreeAttention on host pointers with the CPU kernel. past_len: [B] int64, tree_mask: [B,N,N]
// bytes (0/1). key_cache_out may equal key_cache (in place); otherwise the whole cache is copied
// first. num_threads <= 0: one per hardware thread.
RD_EXPORT int rd_tree_attention_cpu(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t N,
                                    int64_t D, int64_t S, float scale, int64_t window,
                                    float softcap, const void* query, const void* key,
                                    const void* value, const void* key_cache,
                                    const void* value_cache, const int64_t* past_len,
                                    const uint8_t* tree_mask, void* output, void* key_cache_out,
                                    void* value_cache_out, int num_threads);

// The CUDA kernel's algorithm run sequentially on the host: the same launch plan (row chunks,
// key splits), the same 32-key tiles and the same __host__ __device__ tile math (tile_math.h),
// then the same split combine. num_sms: the multiprocessor count whose plan to emulate.
RD_EXPORT int rd_tree_attention_cuda_emulated(int dtype, int64_t B, int64_t Hq, int64_t Hkv,
                                              int64_t N, int64_t D, int64_t S, float scale,
                                              int64_t window, float softcap, const void* query,
                                              const void* key, const void* value,
                                              const void* key_cache, const void* value_cache,
                                              const int64_t* past_len,
                                              const uint8_t* tree_mask, void* output,
                                              void* key_cache_out, void* value_cache_out,
                                              int num_sms);

// TreeAttention with the CUDA kernel: tensors are device pointers, past_len is a HOST array (as
// in the ORT CUDA kernel, where past_len is a CPU input), stream a cudaStream_t (0: default).
// Asynchronous: errors of the launch itself are reported, not those of the running kernel.
RD_EXPORT int rd_tree_attention_cuda(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t N,
                                     int64_t D, int64_t S, float scale, int64_t window,
                                     float softcap, const void* query, const void* key,
                                     const void* value, const void* key_cache,
                                     const void* value_cache, const int64_t* past_len,
                                     const uint8_t* tree_mask, void* output, void* key_cache_out,
                                     void* value_cache_out, void* stream);

// TreeAttention version 2 with the CUDA kernel (tree_attention.h): query [B, N, Hq*D] and
// key, value [B, N, Hkv*D] before rotary, cos and sin [B, N, D], output [B, N, Hq*D]; the rest
// as rd_tree_attention_cuda. D must be even.
RD_EXPORT int rd_tree_attention_rotary_cuda(int dtype, int64_t B, int64_t Hq, int64_t Hkv,
                                            int64_t N, int64_t D, int64_t S, float scale,
                                            int64_t window, float softcap, const void* query,
                                            const void* key, const void* value,
                                            const void* key_cache, const void* value_cache,
                                            const int64_t* past_len,
                                            const uint8_t* tree_mask, void* output,
                                            void* key_cache_out, void* value_cache_out,
                                            const void* cos, const void* sin, void* stream);

// KVCommit on a cache of shape [Z, B, Hkv, S, D] (Z: the product of any leading dims, e.g.
// layers x 2). past_len, count: [B] int64; source: [B, K] int64. cache_out may equal cache.
RD_EXPORT int rd_kv_commit_cpu(int dtype, int64_t Z, int64_t B, int64_t Hkv, int64_t S,
                               int64_t D, int64_t K, const void* cache, void* cache_out,
                               const int64_t* past_len, const int64_t* source,
                               const int64_t* count);

// KVCommit on a device cache; past_len, source and count are HOST arrays (CPU inputs in ORT).
RD_EXPORT int rd_kv_commit_cuda(int dtype, int64_t Z, int64_t B, int64_t Hkv, int64_t S,
                                int64_t D, int64_t K, const void* cache, void* cache_out,
                                const int64_t* past_len, const int64_t* source,
                                const int64_t* count, void* stream);

#ifdef __cplusplus
}  // extern "C"
#endif
