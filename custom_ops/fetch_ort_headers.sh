#!/usr/bin/env bash
# Prints the directory holding ONNX Runtime's C/C++ API headers (onnxruntime_cxx_api.h).
#
# ORT's pip wheels ship no headers. Order of preference:
#   1. $ORT_INCLUDE_DIR, when set (must contain onnxruntime_cxx_api.h);
#   2. a cache, ${XDG_CACHE_HOME:-~/.cache}/redrafter/ort-headers/api29, filled once from the npm
#      package com.github.asus4.onnxruntime@0.4.9, which carries Microsoft's official API-29 headers
#      (a 150 MB tarball; only the Headers/ folder is kept). Never fetched again once present.
# Headers for API 29 build a library that loads in ORT >= 1.29 (checked with 1.30, 1.31, 1.32);
# RegisterCustomOps returns a clear error on an older runtime.
set -euo pipefail

readonly NPM_PACKAGE="com.github.asus4.onnxruntime@0.4.9"
readonly HEADERS_IN_TARBALL="package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers"
readonly API_VERSION=29

die() { echo "fetch_ort_headers: $*" >&2; exit 1; }

if [[ -n "${ORT_INCLUDE_DIR:-}" ]]; then
  [[ -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]] \
    || die "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_cxx_api.h"
  echo "$ORT_INCLUDE_DIR"
  exit 0
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/redrafter/ort-headers"
dest="$cache/api$API_VERSION"
if [[ -f "$dest/onnxruntime_cxx_api.h" ]]; then
  echo "$dest"
  exit 0
fi

command -v npm >/dev/null \
  || die "no ONNX Runtime headers: set ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h, or install npm so they can be fetched once into $cache"

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetch_ort_headers: fetching $NPM_PACKAGE once (150 MB) into $cache" >&2
(cd "$tmp" && npm pack --silent "$NPM_PACKAGE" >/dev/null 2>"$tmp/npm.log") \
  || { cat "$tmp/npm.log" >&2; die "npm pack $NPM_PACKAGE failed"; }
tar -xzf "$tmp"/*.tgz -C "$tmp" "$HEADERS_IN_TARBALL/" || die "headers missing from the tarball"
grep -q "#define ORT_API_VERSION $API_VERSION\$" "$tmp/$HEADERS_IN_TARBALL/onnxruntime_c_api.h" \
  || die "expected ORT_API_VERSION $API_VERSION in $NPM_PACKAGE"
# Rename into place so that a concurrent or interrupted fetch never leaves a half-filled folder.
mv "$tmp/$HEADERS_IN_TARBALL" "$tmp/headers"
mv -T "$tmp/headers" "$dest" 2>/dev/null || [[ -f "$dest/onnxruntime_cxx_api.h" ]]
echo "$dest"
