// KVCommit on the CPU: the accepted rows move to [P, P+count) in order (tree_attention.h).
#include <cstring>
#include <sstream>

#include "tree_attention.h"

namespace redrafter {

std::string check_kv_commit(const KVCommitArgs& a) {
  std::ostringstream err;
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16) {
    err << "KVCommit: element type " << static_cast<int>(a.dtype)
        << " is not supported; use float32 or float16";
    return err.str();
  }
  if (a.Z < 1 || a.B < 1 || a.Hkv < 1 || a.S < 1 || a.D < 1 || a.K < 0) {
    err << "KVCommit: bad dimensions Z=" << a.Z << " B=" << a.B << " Hkv=" << a.Hkv
        << " S=" << a.S << " D=" << a.D << " K=" << a.K;
    return err.str();
  }
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t P = a.past_len[b], n = a.count[b];
    if (P < 0 || P > a.S) {
      err << "KVCommit: past_len[" << b << "] = " << P << " is outside [0, S=" << a.S << "]";
      return err.str();
    }
    if (n < 0 || n > a.K) {
      err << "KVCommit: count[" << b << "] = " << n << " is outside [0, K=" << a.K << "]";
      return err.str();
    }
    for (int64_t k = 0; k < n; ++k) {
      const int64_t src = a.source[b * a.K + k];
      if (src < k || P + src >= a.S) {
        err << "KVCommit: source[" << b << ", " << k << "] = " << src
            << " must be >= " << k << " (in-order move) and past_len + source < S (past_len = "
            << P << ", S = " << a.S << ")";
        return err.str();
      }
    }
  }
  return "";
}

void kv_commit_cpu(const KVCommitArgs& a) {
  const std::size_t es = dtype_size(a.dtype);
  const std::size_t row_bytes = a.D * es;
  if (a.cache_out != a.cache) std::memcpy(a.cache_out, a.cache, a.cache_bytes());
  char* cache = static_cast<char*>(a.cache_out);
  for (int64_t z = 0; z < a.Z; ++z)
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t h = 0; h < a.Hkv; ++h) {
        char* head = cache + (((z * a.B + b) * a.Hkv + h) * a.S) * row_bytes;
        const int64_t P = a.past_len[b];
        for (int64_t k = 0; k < a.count[b]; ++k) {
          const int64_t src = a.source[b * a.K + k];
          if (src != k) std::memcpy(head + (P + k) * row_bytes, head + (P + src) * row_bytes,
                                    row_bytes);
        }
      }
}

}  // namespace redrafter
