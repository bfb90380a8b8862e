// redrafter::MatMulInt4: a float activation times a 4-bit block-quantized weight, with the same
// inputs and attributes as com.microsoft::MatMulNBits (bits = 4), so the ONNX Runtime runtime can
// swap it in for the CPU provider without touching the bundle (redrafter/runtimes/onnxruntime.py).
//
// Why a kernel of our own: ORT 1.31's MatMulNBits either expands the blocks to fp32 from two rows
// on (accuracy level 1: a tree verification costs what the fp32 model costs) or rounds a one-row
// call and a many-row call differently (level 4: speculation stops being lossless). This kernel
// unpacks each block once per call for all rows AND gives every output element the very same
// arithmetic whatever the number of rows, so a tree of N tokens costs little more than one token
// and greedy speculation stays token-identical to greedy autoregressive decoding.
//
// Semantics (M rows, K reduction, N outputs, bs = block_size, KB = ceil(K / bs) blocks):
//   w[n, k]   = B[n, k / bs, (k % bs) / 2] >> (4 * (k % 2)) & 15         (4-bit code)
//   zp[n, kb] = zero_points ? nibble kb of row n : 8                       (zero point)
//   s[n, kb]  = scales[n * KB + kb]
// The activation is quantized per row in sub-blocks of 32 (j = k / 32), symmetric int8:
//   amax = max |A[m, 32j : 32j + 32]|,  as[m, j] = amax / 127,  aq[m, k] = round(A[m, k] * 127 / amax)
// and every output element is accumulated in the same order, sub-block by sub-block:
//   Y[m, n] = bias[n] + sum_j  float(sum_{k in j} (w[n, k] - zp[n, kb(k)]) * aq[m, k]) * (s[n, kb] * as[m, j])
// where each step of the outer sum is one fused multiply-add into an fp32 accumulator.
// Float zero points (zero_points float32 [N * KB], as MatMulNBits allows: w = (code - zf) * s,
// e.g. a GGUF Q4_1 block d * code + m, or HQQ) keep the codes unsigned and add the offset
// o[n, kb] = -(zf[n, kb] * s[n, kb]) times the sub-block's activation sum, one more fused step:
//   acc = fma(float(sum_{k in j} w[n, k] * aq[m, k]), s[n, kb] * as[m, j], acc)
//   acc = fma(o[n, kb], as[m, j] * float(sum_{k in j} aq[m, k]), acc) The inner
// sums are exact integers, so the result depends neither on the number of rows, nor on the
// instruction set (AMX-INT8, AVX-512 VNNI or the portable loop), nor on the thread count.
//
// Shapes: A [..., K] float32 (M = product of the leading dims), B uint8 [N, KB, bs / 2],
// scales float32 [N * KB] (or [N, KB]), zero_points uint8 [N * ceil(KB / 2)] or float32
// [N * KB] (optional),
// g_idx (must be absent), bias float32 [N] (optional); Y [..., N] float32, or with the node's
// `split` attribute (ints: positive widths summing to N, one per output, at most
// REDRAFTER_MATMUL_INT4_MAX_OUTPUTS) Y_j [..., split[j]]: the columns of Y, in order.
// Two more optional inputs fold the float steps around a projection into the node, each the
// one IEEE operation the folded node did, so the bits are those of the unfolded graph:
//   residual float32 [..., N] (input 6; one output only): Y = (A x W + bias) + residual, the
//     Add of a residual stream;
//   gate float32 [..., K] (input 7, A's shape): the product takes A * gate (elementwise) in
//     place of A, the Mul of a SwiGLU's two halves before its down projection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tree_attention.h"  // ParallelRunner

namespace redrafter {

// The weight re-laid for the kernel, built once per node from B, scales and zero_points.
// Columns are grouped by 16 (a "tile", one AVX-512 register of outputs) and tiles by up to 8 (a
// "group", one unit of parallel work); within a group, for each 32-wide sub-block of K, the tiles'
// codes follow each other, 256 bytes per tile: chunk c (0..3) holds, for column j of the tile,
// byte 4j + u = w[k0 + 8c + u] | w[k0 + 8c + 4 + u] << 4, so one load and two masks give the
// 4-code groups that a dot-product instruction multiplies with 4 activation bytes.
struct PackedInt4 {
  int64_t K = 0, N = 0, block_size = 0, KB = 0, KS = 0, tiles = 0, groups = 0;
  bool symmetric = true;  // every zero point is 8
  std::vector<uint8_t> codes;    // [groups][KS][tiles in group][4][64]
  std::vector<float> scales;     // [groups][KB][tiles in group][16]
  std::vector<uint8_t> zeros;    // [groups][KB][tiles in group][16], empty when symmetric
  // [groups][KB][tiles in group][16]: -zero_point * scale for float zero points (zeros then
  // holds 0), else empty
  std::vector<float> offsets;
  std::vector<float> bias;       // [N] or empty
};

constexpr int64_t kTile = 16;      // outputs per tile
constexpr int64_t kGroup = 8;      // tiles per group
constexpr int64_t kSubBlock = 32;  // activation quantization block
// From this many rows the AMX path runs by default; 0: never (measured slower than VNNI at every
// row count of the demo model's shapes, benchmarks/RESULTS.md 2026-12-05), REDRAFTER_CPU_ISA=amx
// still forces it.
constexpr int64_t kAmxMinRows = 0;

// "" or what is wrong with the attributes/shapes (checked before packing).
std::string check_matmul_int4(int64_t K, int64_t N, int64_t block_size, int64_t bits);

// Builds the packed weight. zero_points (packed 4-bit), float_zero_points (at most one of the
// two) and bias may be null.
PackedInt4 pack_int4(int64_t K, int64_t N, int64_t block_size, const uint8_t* B,
                     const float* scales, const uint8_t* zero_points,
                     const float* float_zero_points, const float* bias);

// Y[M, N] = A[M, K] x W, as stated above. Scratch is allocated per call. The AVX-512 VNNI path
// runs where the CPU has it (the AMX-INT8 path instead from kAmxMinRows rows, where the CPU and
// OS allow it), else the portable loop; allow_simd = false or REDRAFTER_CPU_ISA=base forces the
// loop, REDRAFTER_CPU_ISA=vnni|amx forces that path at every M (throws if it cannot run here).
void matmul_int4_cpu(const PackedInt4& w, const float* A, int64_t M, float* Y,
                     const ParallelRunner& runner, bool allow_simd = true);

}  // namespace redrafter
