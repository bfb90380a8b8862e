#!/usr/bin/env bash
# Builds the native op library: build/ops/libredrafter_ops.so (or $1/libredrafter_ops.so).
#
#   custom_ops/build.sh [OUT_DIR]
#
# CPU kernels always; CUDA kernels too when nvcc is found ($NVCC, then PATH, then
# /usr/local/cuda/bin/nvcc), linked with a static cudart so the library still loads on machines
# without CUDA. Set REDRAFTER_OPS_NO_CUDA=1 to build CPU-only. ORT headers: see fetch_ort_headers.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/custom_ops/tree_attention"
int4="$root/custom_ops/matmul_int4"
out="$(mkdir -p "${1:-$root/build/ops}" && cd "${1:-$root/build/ops}" && pwd)"
obj="$out/obj"
mkdir -p "$obj"

ort_include="$("$root/custom_ops/fetch_ort_headers.sh")"

CXX="${CXX:-$(command -v c++ || command -v g++ || true)}"
[[ -n "$CXX" ]] || { echo "build.sh: no C++ compiler (c++ or g++)" >&2; exit 1; }

arch_flags=()
# x86-64-v2 (SSE4.2) keeps the library portable; the hot loops also get an AVX2+FMA clone that
# is picked at run time (see tree_attention_cpu.cc). Never -march=native: the .so travels.
[[ "$(uname -m)" == "x86_64" ]] && arch_flags=(-march=x86-64-v2)
# -Wno-psabi: the kernel's inline helpers pass 64-byte vectors (cpu_tile_kernel.inc); GCC warns
# that their calling convention differs between the clones, which never call each other.
cxxflags=(-std=c++17 -O3 "${arch_flags[@]}" -fPIC -pthread -fvisibility=hidden
          -fopenmp-simd -fno-trapping-math -Wall -Wextra -Wno-unused-parameter -Wno-psabi
          -I"$src" -I"$int4" -I"$ort_include")

nvcc=""
if [[ "${REDRAFTER_OPS_NO_CUDA:-0}" != "1" ]]; then
  for candidate in "${NVCC:-}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then nvcc="$candidate"; break; fi
  done
fi
[[ -n "$nvcc" ]] && cxxflags+=(-DREDRAFTER_WITH_CUDA=1)

start=$SECONDS
pids=()
objects=()
compile_cxx() {  # source file name in $src (or a path under custom_ops/)
  local name path
  name="$(basename "${1%.cc}")"
  path="$src/$1"
  [[ -f "$path" ]] || path="$root/custom_ops/$1"
  "$CXX" "${cxxflags[@]}" -c "$path" -o "$obj/$name.o" &
  pids+=($!)
  objects+=("$obj/$name.o")
}

if [[ -n "$nvcc" ]]; then
  # sm_80 and sm_90 machine code plus compute_90 PTX for newer GPUs (CUDA 13 dropped < sm_75).
  "$nvcc" -std=c++17 -O3 -DREDRAFTER_WITH_CUDA=1 -I"$src" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -gencode arch=compute_90,code=compute_90 \
    -Xcompiler -fPIC,-fvisibility=hidden,-pthread \
    -c "$src/tree_attention_cuda.cu" -o "$obj/tree_attention_cuda.o" &
  pids+=($!)
  objects+=("$obj/tree_attention_cuda.o")
fi
for file in tree_attention_cpu.cc tree_attention_rotary_cpu.cc kv_commit_cpu.cc tree_attention_emulation.cc \
    c_api.cc register_ops.cc matmul_int4/matmul_int4_cpu.cc; do
  compile_cxx "$file"
done

status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[[ $status -eq 0 ]] || { echo "build.sh: compilation failed" >&2; exit 1; }

tmp_lib="$out/.libredrafter_ops.so.$$"
link_flags=(-shared -Wl,--version-script="$root/custom_ops/exports.map" -Wl,--no-undefined)
if [[ -n "$nvcc" ]]; then
  "$nvcc" -shared -cudart static -Xcompiler -pthread \
    -Xlinker --version-script="$root/custom_ops/exports.map" -o "$tmp_lib" "${objects[@]}" -ldl -lrt
else
  "$CXX" "${link_flags[@]}" -pthread -o "$tmp_lib" "${objects[@]}"
fi
mv -f "$tmp_lib" "$out/libredrafter_ops.so"  # atomic: a test never loads a half-written library

kind="CPU"
[[ -n "$nvcc" ]] && kind="CPU + CUDA ($("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
echo "built $out/libredrafter_ops.so [$kind] in $((SECONDS - start)) s"
