#!/usr/bin/env bash
# pack.sh — packs a CUDA build of nrlua for the GPU machine (run here, where it was built).
#   tests/gpu/pack.sh [BUILD_DIR]        (default: the newer of build-cuda and build, which
#                                         ./scripts/test.sh builds with CUDA wherever nvcc is)
#                                         -> BUILD_DIR/gpu-pack.tar.xz
# What it packs: bin/nrlua and bin/libnr.so (nrlua finds libnr beside itself; LuaJIT and cudart
# are linked statically), lib/ with the shared libraries the GPU image may lack (OpenBLAS, oneDNN,
# libpng, libjpeg-turbo, readline, gomp, ...), lua51/ with Debian's Lua C modules (cjson).
# What it leaves out: glibc, libstdc++/libgcc and the CUDA libraries (cuBLAS, cuDNN), which come
# from PyTorch's pip packages on the GPU machine (tests/gpu/run.sh sets LD_LIBRARY_PATH).
# Carry the tarball (it is under an ignored build folder) and run tests/gpu/run.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
B="${1:-}"
# without an argument: the more recently built of build-cuda/ and build/
if [ -z "$B" ]; then
  B=build
  [ -x build-cuda/nrlua ] && { [ ! -x build/nrlua ] || [ build-cuda/libnr.so -nt build/libnr.so ]; } && B=build-cuda
fi
[ -x "$B/nrlua" ] && [ -f "$B/libnr.so" ] || { echo "pack: no nrlua/libnr.so in $B (build it first)" >&2; exit 1; }
syms="$(nm -D --defined-only "$B/libnr.so")"
grep -q nr_cuda_conv2d_forward <<<"$syms" ||
  { echo "pack: $B/libnr.so was built without CUDA" >&2; exit 1; }
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/nrgpu/bin" "$stage/nrgpu/lib" "$stage/nrgpu/lua51"
cp "$B/nrlua" "$B/libnr.so" "$stage/nrgpu/bin/"
ldd "$B/libnr.so" "$B/nrlua" | awk '/=> \//{print $3}' | sort -u | while read -r f; do
  case "$(basename "$f")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libstdc++*|libgcc_s*|libcublas*|libcudnn*|libcuda*|libnvidia*) ;;
    *) cp -L "$f" "$stage/nrgpu/lib/" ;;
  esac
done
for m in cjson lfs; do
  cp -L "/usr/lib/x86_64-linux-gnu/lua/5.1/$m.so" "$stage/nrgpu/lua51/" 2>/dev/null || true
done
git rev-parse HEAD > "$stage/nrgpu/COMMIT" 2>/dev/null || true
tar -C "$stage" -cf - nrgpu | xz -T2 -6 > "$B/gpu-pack.tar.xz"
ls -la "$B/gpu-pack.tar.xz"
