// Registers redrafter::TreeAttention, redrafter::KVCommit (tree_attention.h) and redrafter::MatMulInt4
// (matmul_int4.h, CPU and float32 only) with ONNX Runtime:
// float32 and float16 kernels for the CPU execution provider and, when built with nvcc, for the
// CUDA execution provider. ORT picks the kernel by the node's element type and provider.
//
// Load it with SessionOptions.register_custom_ops_library(path) (redrafter/ops.py: register()).
// Built against ORT's API 29 headers: onnxruntime >= 1.29.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "matmul_int4.h"
#include "tree_attention.h"

namespace redrafter {
namespace {

constexpr const char* kCpuProvider = "CPUExecutionProvider";
constexpr const char* kCudaProvider = "CUDAExecutionProvider";

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

struct Input {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  const void* data;
};

Input get_input(const Ort::KernelContext& ctx, std::size_t index) {
  Ort::ConstValue value = ctx.GetInput(index);
  Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
  return Input{info.GetElementType(), info.GetShape(), value.GetTensorRawData()};
}

// "" when `in` has shape `want`, else a message naming the input and both shapes.
std::string expect_shape(const char* op, const char* name, const Input& in,
                         const std::vector<int64_t>& want) {
  if (in.shape == want) return "";
  return std::string(op) + ": input '" + name + "' has shape " + shape_string(in.shape) +
         ", expected " + shape_string(want);
}

OrtStatus* error_status(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

// Runs the CPU kernel's work items on the session's intra-op thread pool.
struct OrtRunner final : ParallelRunner {
  explicit OrtRunner(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void run(std::size_t total, void (*fn)(void*, std::size_t), void* user) const override {
    if (total == 1) return fn(user, 0);
    ctx_.ParallelFor(fn, total, 0, user);
  }
  int num_threads() const override {
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }

 private:
  const Ort::KernelContext& ctx_;
};

void warn_copy_once(const Ort::KernelContext& ctx, std::once_flag& flag, const char* op) {
  std::call_once(flag, [&] {
    const std::string msg =
        std::string("redrafter::") + op +
        ": the cache output is not bound to the cache input's buffer, so every call copies the "
        "whole cache. Bind one OrtValue as both (io_binding: bind_ortvalue_input + "
        "bind_ortvalue_output) to update it in place.";
    Ort::Logger logger = ctx.GetLogger();
    ORT_CXX_LOG_NOEXCEPT(logger, ORT_LOGGING_LEVEL_WARNING, msg.c_str());
  });
}

// Converts C++ exceptions (the Ort:: wrappers throw) into a status: nothing crosses the C ABI.
template <typename Body>
OrtStatus* guarded(Body body) {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return error_status(e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return error_status(e.what(), ORT_RUNTIME_EXCEPTION);
  }
}

// ---- TreeAttention ---------------------------------------------------------------------------

struct TreeAttentionKernel {
  TreeAttentionKernel(const OrtApi& api, const OrtKernelInfo* info, bool cuda, int version)
      : cuda_(cuda), version_(version) {
    float scale = 0.0f;
    if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, "scale", &scale)) {
      api.ReleaseStatus(status);  // absent: 1/sqrt(D)
      scale = 0.0f;
    }
    scale_ = scale;
    int64_t window = 0;  // absent: no sliding window
    if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, "window", &window)) {
      api.ReleaseStatus(status);
      window = 0;
    }
    window_ = window;
    float softcap = 0.0f;  // absent: no soft-capping
    if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, "softcap", &softcap)) {
      api.ReleaseStatus(status);
      softcap = 0.0f;
    }
    softcap_ = softcap;
  }

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded([&]() -> OrtStatus* {
      constexpr const char* op = "TreeAttention";
      Ort::KernelContext ctx(context);
      const Input q = get_input(ctx, 0), k = get_input(ctx, 1), v = get_input(ctx, 2),
                  kc = get_input(ctx, 3), vc = get_input(ctx, 4), past = get_input(ctx, 5),
                  mask = get_input(ctx, 6);
      const bool v2 = version_ >= 2;  // token-major [B, N, H*D] and rotary inside
      if (q.shape.size() != (v2 ? 3u : 4u) || kc.shape.size() != 4)
        return error_status(std::string(op) + ": query " + shape_string(q.shape) +
                            " and key_cache " + shape_string(kc.shape) + " must be " +
                            (v2 ? "[B, N, Hq*D]" : "[B, Hq, N, D]") + " and [B, Hkv, S, D]");
      const int64_t B = q.shape[0], Hkv = kc.shape[1], S = kc.shape[2], D = kc.shape[3];
      const int64_t N = v2 ? q.shape[1] : q.shape[2];
      if (v2 && (D <= 0 || D % 2 != 0 || q.shape[2] % D != 0))
        return error_status(std::string(op) + ": query width " + std::to_string(q.shape[2]) +
                            " must be a multiple of the cache's head dim " + std::to_string(D) +
                            ", which must be even (rotate_half)");
      const int64_t Hq = v2 ? q.shape[2] / D : q.shape[1];
      const std::vector<int64_t> kv_shape =
          v2 ? std::vector<int64_t>{B, N, Hkv * D} : std::vector<int64_t>{B, Hkv, N, D};
      std::string err;
      for (const std::string& e :
           {expect_shape(op, "key", k, kv_shape), expect_shape(op, "value", v, kv_shape),
            expect_shape(op, "key_cache", kc, {B, Hkv, S, D}),
            expect_shape(op, "value_cache", vc, {B, Hkv, S, D}),
            expect_shape(op, "past_len", past, {B}), expect_shape(op, "tree_mask", mask, {B, N, N})})
        if (err.empty()) err = e;
      Input cos{}, sin{};
      if (v2) {
        if (!ctx.GetInput(7) || !ctx.GetInput(8))
          return error_status(std::string(op) + ": cos and sin must both be given (version 2)");
        cos = get_input(ctx, 7);
        sin = get_input(ctx, 8);
        for (const std::string& e :
             {expect_shape(op, "cos", cos, {B, N, D}), expect_shape(op, "sin", sin, {B, N, D})})
          if (err.empty()) err = e;
      }
      if (!err.empty()) return error_status(err);
      for (const Input* in : {&k, &v, &kc, &vc})
        if (in->type != q.type)
          return error_status(std::string(op) + ": query, key, value and the caches must share "
                                                "one element type");

      TreeAttentionArgs a;
      a.dtype = q.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;
      a.B = B;
      a.Hq = Hq;
      a.Hkv = Hkv;
      a.N = N;
      a.D = D;
      a.S = S;
      a.scale = resolve_scale(scale_, D > 0 ? D : 1);
      a.window = window_;
      a.softcap = softcap_;
      a.query = q.data;
      a.key = k.data;
      a.value = v.data;
      a.key_cache = kc.data;
      a.value_cache = vc.data;
      a.past_len = static_cast<const int64_t*>(past.data);
      a.tree_mask = static_cast<const uint8_t*>(mask.data);
      err = check_tree_attention(a);
      if (!err.empty()) return error_status(err);

      a.output = ctx.GetOutput(0, q.shape).GetTensorMutableRawData();
      a.key_cache_out = ctx.GetOutput(1, kc.shape).GetTensorMutableRawData();
      a.value_cache_out = ctx.GetOutput(2, vc.shape).GetTensorMutableRawData();
      if (a.key_cache_out != a.key_cache || a.value_cache_out != a.value_cache)
        warn_copy_once(ctx, copy_warning_, op);
      const RotaryLayoutArgs r{q.data, k.data, v.data, cos.data, sin.data, a.output};

      if (!cuda_) {
        if (v2)
          tree_attention_rotary_cpu(a, r, OrtRunner(ctx));
        else
          tree_attention_cpu(a, OrtRunner(ctx));
        return nullptr;
      }
#if defined(REDRAFTER_WITH_CUDA)
      void* stream = ctx.GetGPUComputeStream();
      err = v2 ? tree_attention_rotary_cuda(a, r, stream) : tree_attention_cuda(a, stream);
      return err.empty() ? nullptr : error_status(err, ORT_RUNTIME_EXCEPTION);
#else
      return error_status("redrafter ops: built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
    });
  }

 private:
  bool cuda_;
  int version_;
  float scale_;
  int64_t window_;
  float softcap_;
  std::once_flag copy_warning_;
};

// One registration serves both op versions. ORT keeps one schema per op name (one input count),
// and a versioned registration is not matched by the model's opset version, so the node's own
// inputs tell: version 2 nodes have cos and sin (inputs 7 and 8), version 1 nodes stop at 7.
template <ONNXTensorElementDataType kType, bool kCuda>
struct TreeAttentionOp
    : Ort::CustomOpBase<TreeAttentionOp<kType, kCuda>, TreeAttentionKernel, /*WithStatus=*/true> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&]() -> OrtStatus* {
      const int version = Ort::ConstKernelInfo(info).GetInputCount() >= 9 ? 2 : 1;
      *kernel = new TreeAttentionKernel(api, info, kCuda, version);
      return nullptr;
    });
  }
  const char* GetName() const { return REDRAFTER_TREE_ATTENTION_OP; }
  const char* GetExecutionProviderType() const { return kCuda ? kCudaProvider : kCpuProvider; }
  // query, key, value, key_cache, value_cache, past_len, tree_mask, cos, sin (version 2 only)
  size_t GetInputTypeCount() const { return 9; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 5) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return kType;
  }
  // past_len is read on the host (range checks, launch plan): a CPU input on the CUDA provider.
  OrtMemType GetInputMemoryType(size_t i) const {
    return kCuda && i == 5 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  // output, key_cache_out, value_cache_out
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

// ---- KVCommit --------------------------------------------------------------------------------

struct KVCommitKernel {
  KVCommitKernel(const OrtApi&, const OrtKernelInfo*, bool cuda) : cuda_(cuda) {}

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded([&]() -> OrtStatus* {
      constexpr const char* op = "KVCommit";
      Ort::KernelContext ctx(context);
      const Input cache = get_input(ctx, 0), past = get_input(ctx, 1), source = get_input(ctx, 2),
                  count = get_input(ctx, 3);
      const std::size_t rank = cache.shape.size();
      if (rank < 4)
        return error_status(std::string(op) + ": cache has shape " + shape_string(cache.shape) +
                            ", expected [..., B, Hkv, S, D]");
      const int64_t B = cache.shape[rank - 4];
      if (source.shape.size() != 2 || source.shape[0] != B)
        return error_status(std::string(op) + ": source has shape " +
                            shape_string(source.shape) + ", expected [B=" + std::to_string(B) +
                            ", K]");
      std::string err = expect_shape(op, "past_len", past, {B});
      if (err.empty()) err = expect_shape(op, "count", count, {B});
      if (!err.empty()) return error_status(err);

      KVCommitArgs a;
      a.dtype =
          cache.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;
      a.Z = 1;
      for (std::size_t i = 0; i + 4 < rank; ++i) a.Z *= cache.shape[i];
      a.B = B;
      a.Hkv = cache.shape[rank - 3];
      a.S = cache.shape[rank - 2];
      a.D = cache.shape[rank - 1];
      a.K = source.shape[1];
      a.cache = cache.data;
      a.past_len = static_cast<const int64_t*>(past.data);
      a.source = static_cast<const int64_t*>(source.data);
      a.count = static_cast<const int64_t*>(count.data);
      err = check_kv_commit(a);
      if (!err.empty()) return error_status(err);

      a.cache_out = ctx.GetOutput(0, cache.shape).GetTensorMutableRawData();
      if (a.cache_out != a.cache) warn_copy_once(ctx, copy_warning_, op);
      if (!cuda_) {
        kv_commit_cpu(a);
        return nullptr;
      }
#if defined(REDRAFTER_WITH_CUDA)
      err = kv_commit_cuda(a, ctx.GetGPUComputeStream());
      return err.empty() ? nullptr : error_status(err, ORT_RUNTIME_EXCEPTION);
#else
      return error_status("redrafter ops: built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
    });
  }

 private:
  bool cuda_;
  std::once_flag copy_warning_;
};

template <ONNXTensorElementDataType kType, bool kCuda>
struct KVCommitOp
    : Ort::CustomOpBase<KVCommitOp<kType, kCuda>, KVCommitKernel, /*WithStatus=*/true> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&]() -> OrtStatus* {
      *kernel = new KVCommitKernel(api, info, kCuda);
      return nullptr;
    });
  }
  const char* GetName() const { return REDRAFTER_KV_COMMIT_OP; }
  const char* GetExecutionProviderType() const { return kCuda ? kCudaProvider : kCpuProvider; }
  // cache, past_len, source, count
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? kType : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  OrtMemType GetInputMemoryType(size_t i) const {
    return kCuda && i > 0 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

// ---- MatMulInt4 ------------------------------------------------------------------------------

// Packed weights shared by the nodes that read the same initializers: a drafter graph unrolls its
// recurrent step L - 1 times over one set of weights, so without sharing each call would stream
// L - 1 re-laid copies through the caches instead of one. Keyed by the source buffers (alive and
// unchanged while any node holding the packed copy is, since ORT keeps a session's initializers
// for the session's life) and the attributes; an entry lasts as long as a kernel holds it.
class PackedCache {
 public:
  using Key = std::tuple<const void*, const void*, const void*, const void*, const void*, int64_t,
                         int64_t, int64_t>;

  std::shared_ptr<const PackedInt4> get(const Key& key,
                                        const std::function<PackedInt4()>& build) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {  // drop entries nobody holds
      if (it->second.expired()) it = entries_.erase(it);
      else ++it;
    }
    auto found = entries_.find(key);
    if (found != entries_.end())
      if (auto held = found->second.lock()) return held;
    auto made = std::make_shared<const PackedInt4>(build());
    entries_[key] = made;
    return made;
  }

 private:
  std::mutex mu_;
  std::map<Key, std::weak_ptr<const PackedInt4>> entries_;
};

PackedCache& packed_cache() {
  // Never destroyed: a session torn down during process exit may still create or drop kernels.
  static PackedCache* cache = new PackedCache;
  return *cache;
}

// MatMulNBits' inputs and attributes (matmul_int4.h). The weight is constant (an initializer):
// it is re-laid once, on the first call (or taken from another node over the same initializers),
// and again only if ORT hands a different buffer.
struct MatMulInt4Kernel {
  MatMulInt4Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    K_ = k.GetAttribute<int64_t>("K");
    N_ = k.GetAttribute<int64_t>("N");
    block_size_ = k.GetAttribute<int64_t>("block_size");
    bits_ = k.GetAttribute<int64_t>("bits");
    // `split` (optional ints): the widths of the outputs the columns go to, in order, as a
    // Split of the last axis would send them. A fused projection (q/k/v, gate/up) then needs no
    // Split node after it: ~10 us of dispatch each, 60 per step of a 30-layer model.
    const OrtApi& api = Ort::GetApi();
    size_t count = 0;
    if (OrtStatus* absent = api.KernelInfoGetAttributeArray_int64(info, "split", nullptr, &count)) {
      api.ReleaseStatus(absent);
    } else {
      split_.resize(count);
      Ort::ThrowOnError(
          api.KernelInfoGetAttributeArray_int64(info, "split", split_.data(), &count));
    }
    split_error_ = check_split(k.GetOutputCount());  // reported by each call, as a bad input
  }

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded([&]() -> OrtStatus* {
      constexpr const char* op = "MatMulInt4";
      Ort::KernelContext ctx(context);
      std::string err = check_matmul_int4(K_, N_, block_size_, bits_);
      if (!err.empty()) return error_status(err);
      const Input a = get_input(ctx, 0), b = get_input(ctx, 1), s = get_input(ctx, 2);
      const int64_t KB = (K_ + block_size_ - 1) / block_size_;
      if (a.shape.empty() || a.shape.back() != K_)
        return error_status(std::string(op) + ": A has shape " + shape_string(a.shape) +
                            ", expected [..., K=" + std::to_string(K_) + "]");
      err = expect_shape(op, "B", b, {N_, KB, block_size_ / 2});
      if (err.empty()) {
        int64_t count = 1;
        for (int64_t d : s.shape) count *= d;
        if (count != N_ * KB)
          err = std::string(op) + ": scales has shape " + shape_string(s.shape) + ", expected " +
                std::to_string(N_ * KB) + " values";
      }
      // zero_points: packed 4-bit uint8 [N * ceil(KB / 2)] or float32 [N * KB] (matmul_int4.h)
      const uint8_t* zero_points = nullptr;
      const float* float_zero_points = nullptr;
      const float* bias = nullptr;
      if (ctx.GetInputCount() > 3 && ctx.GetInput(3)) {
        const Input z = get_input(ctx, 3);
        const ONNXTensorElementDataType type = z.type;
        int64_t count = 1;
        for (int64_t d : z.shape) count *= d;
        if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          if (err.empty() && count != N_ * KB)
            err = std::string(op) + ": float zero_points has shape " + shape_string(z.shape) +
                  ", expected " + std::to_string(N_ * KB) + " values";
          float_zero_points = static_cast<const float*>(z.data);
        } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
          if (err.empty() && count != N_ * ((KB + 1) / 2))
            err = std::string(op) + ": zero_points has shape " + shape_string(z.shape) +
                  ", expected " + std::to_string(N_ * ((KB + 1) / 2)) + " packed 4-bit values";
          zero_points = static_cast<const uint8_t*>(z.data);
        } else if (err.empty()) {
          err = std::string(op) + ": zero_points must be uint8 (packed 4-bit) or float32";
        }
      }
      if (ctx.GetInputCount() > 4 && ctx.GetInput(4) && err.empty())
        err = std::string(op) + ": g_idx is not supported (act-order GPTQ)";
      if (ctx.GetInputCount() > 5 && ctx.GetInput(5)) {
        const Input bi = get_input(ctx, 5);
        if (err.empty()) err = expect_shape(op, "bias", bi, {N_});
        bias = static_cast<const float*>(bi.data);
      }
      std::vector<int64_t> out_shape = a.shape;
      out_shape.back() = N_;
      const float* residual = nullptr;
      if (ctx.GetInputCount() > 6 && ctx.GetInput(6)) {
        const Input re = get_input(ctx, 6);
        if (err.empty()) err = expect_shape(op, "residual", re, out_shape);
        if (err.empty() && !split_.empty())
          err = std::string(op) + ": residual needs a single output (no `split`)";
        residual = static_cast<const float*>(re.data);
      }
      const float* activation = static_cast<const float*>(a.data);
      if (ctx.GetInputCount() > 7 && ctx.GetInput(7)) {
        const Input ga = get_input(ctx, 7);
        if (err.empty()) err = expect_shape(op, "gate", ga, a.shape);
        if (err.empty()) {
          // A * gate, as the folded Mul node computed it: one rounding per element.
          const float* g = static_cast<const float*>(ga.data);
          const int64_t count = std::accumulate(a.shape.begin(), a.shape.end(), int64_t{1},
                                                std::multiplies<int64_t>());
          thread_local std::vector<float> gated;
          gated.resize(static_cast<size_t>(count));
          for (int64_t i = 0; i < count; ++i) gated[i] = activation[i] * g[i];
          activation = gated.data();
        }
      }
      if (!err.empty()) return error_status(err);
      if (!split_error_.empty()) return error_status(split_error_);
      const std::shared_ptr<const PackedInt4> held =
          packed(b.data, static_cast<const float*>(s.data), zero_points, float_zero_points, bias);
      const PackedInt4& w = *held;
      const int64_t M = a.shape.size() == 1
                            ? 1
                            : std::accumulate(a.shape.begin(), a.shape.end() - 1, int64_t{1},
                                              std::multiplies<int64_t>());
      if (split_.empty()) {
        float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
        matmul_int4_cpu(w, activation, M, y, OrtRunner(ctx));
        if (residual)  // (A x W + bias) + residual, as the folded Add computed it
          for (int64_t i = 0; i < M * N_; ++i) y[i] = y[i] + residual[i];
        return nullptr;
      }
      // Split outputs: the whole product into scratch, then each output's columns row by row
      // (M x N floats: a few microseconds against the ~10 us of a Split node's dispatch).
      thread_local std::vector<float> scratch;
      scratch.resize(static_cast<size_t>(M * N_));
      matmul_int4_cpu(w, activation, M, scratch.data(), OrtRunner(ctx));
      int64_t first = 0;
      for (size_t j = 0; j < split_.size(); ++j) {
        const int64_t width = split_[j];
        out_shape.back() = width;
        float* y = ctx.GetOutput(j, out_shape).GetTensorMutableData<float>();
        for (int64_t m = 0; m < M; ++m)
          std::memcpy(y + m * width, scratch.data() + m * N_ + first, sizeof(float) * width);
        first += width;
      }
      return nullptr;
    });
  }

 private:
  // "" when the split attribute (if any) matches N and the node's outputs, else the error.
  std::string check_split(size_t outputs) const {
    std::ostringstream err;
    if (split_.empty()) {
      if (outputs != 1)
        err << "MatMulInt4: " << outputs << " outputs need a `split` attribute of as many widths";
      return err.str();
    }
    int64_t total = 0;
    bool positive = true;
    for (int64_t width : split_) {
      total += width;
      positive = positive && width > 0;
    }
    if (split_.size() != outputs || !positive || total != N_)
      err << "MatMulInt4: `split` must give " << outputs << " positive widths summing to N = "
          << N_ << ", got " << split_.size() << " summing to " << total;
    return err.str();
  }

  std::shared_ptr<const PackedInt4> packed(const void* B, const float* scales,
                                           const uint8_t* zero_points,
                                           const float* float_zero_points, const float* bias) {
    std::lock_guard<std::mutex> lock(mu_);
    if (source_ != B || !packed_) {
      const PackedCache::Key key{B, scales, zero_points, float_zero_points, bias, K_, N_,
                                 block_size_};
      packed_ = packed_cache().get(key, [&] {
        return pack_int4(K_, N_, block_size_, static_cast<const uint8_t*>(B), scales,
                         zero_points, float_zero_points, bias);
      });
      source_ = B;
    }
    return packed_;
  }

  int64_t K_ = 0, N_ = 0, block_size_ = 0, bits_ = 0;
  std::vector<int64_t> split_;
  std::string split_error_;
  std::mutex mu_;
  const void* source_ = nullptr;
  std::shared_ptr<const PackedInt4> packed_;
};

struct MatMulInt4Op
    : Ort::CustomOpBase<MatMulInt4Op, MatMulInt4Kernel, /*WithStatus=*/true> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&]() -> OrtStatus* {
      *kernel = new MatMulInt4Kernel(api, info);
      return nullptr;
    });
  }
  const char* GetName() const { return REDRAFTER_MATMUL_INT4_OP; }
  const char* GetExecutionProviderType() const { return kCpuProvider; }
  // A, B, scales, zero_points, g_idx, bias: MatMulNBits' inputs, in its order; then residual
  // and gate (matmul_int4.h)
  size_t GetInputTypeCount() const { return REDRAFTER_MATMUL_INT4_MAX_INPUTS; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // uint8 or float32 (checked)
    if (i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  // Y, or with `split` one output per width (the first required, the rest optional).
  size_t GetOutputTypeCount() const { return REDRAFTER_MATMUL_INT4_MAX_OUTPUTS; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

// One domain for the whole process: session options only keep a pointer to it, so every
// RegisterCustomOps call adds the same object, and it is never released (sessions may outlive
// any point where it would be safe to).
OrtStatus* shared_domain(const OrtApi* api, OrtCustomOpDomain** out) {
  static std::mutex mu;
  static OrtCustomOpDomain* domain = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (domain == nullptr) {
    static TreeAttentionOp<kF32, false> attention_f32_cpu;
    static TreeAttentionOp<kF16, false> attention_f16_cpu;
    static KVCommitOp<kF32, false> commit_f32_cpu;
    static KVCommitOp<kF16, false> commit_f16_cpu;
    static MatMulInt4Op matmul_int4_cpu;
    std::vector<OrtCustomOp*> ops = {&attention_f32_cpu, &attention_f16_cpu, &commit_f32_cpu,
                                     &commit_f16_cpu, &matmul_int4_cpu};
#if defined(REDRAFTER_WITH_CUDA)
    static TreeAttentionOp<kF32, true> attention_f32_cuda;
    static TreeAttentionOp<kF16, true> attention_f16_cuda;
    static KVCommitOp<kF32, true> commit_f32_cuda;
    static KVCommitOp<kF16, true> commit_f16_cuda;
    ops.insert(ops.end(),
               {&attention_f32_cuda, &attention_f16_cuda, &commit_f32_cuda, &commit_f16_cuda});
#endif
    OrtCustomOpDomain* created = nullptr;
    if (OrtStatus* status = api->CreateCustomOpDomain(REDRAFTER_OP_DOMAIN, &created)) return status;
    for (OrtCustomOp* op : ops)
      if (OrtStatus* status = api->CustomOpDomain_Add(created, op)) {
        api->ReleaseCustomOpDomain(created);
        return status;
      }
    domain = created;
  }
  *out = domain;
  return nullptr;
}

}  // namespace
}  // namespace redrafter

extern "C" RD_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An onnxruntime older than the headers we were built with. CreateStatus has been in the API
    // since version 1, so ask for that one to say so.
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg =
        "redrafter ops library needs ONNX Runtime API version " + std::to_string(ORT_API_VERSION) +
        " (onnxruntime >= 1." + std::to_string(ORT_API_VERSION) + "), but this onnxruntime is " +
        api_base->GetVersionString() + ": upgrade onnxruntime or run without the native ops";
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = redrafter::shared_domain(api, &domain)) return status;
  return api->AddCustomOpDomain(options, domain);
}
