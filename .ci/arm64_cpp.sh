#!/usr/bin/env bash
# arm64 C++ proof on an x86-64 host: cross-build the library (top-level CMakeLists, ISAs scalar
# and neon) with the aarch64 toolchain, install it into a prefix, build the tests/cpp ctest suite
# against that install, and run it under qemu-aarch64 twice: with the default ISA (neon; the
# dispatch test checks that it is the default) and forced to the scalar reference path.
#
#   bash .ci/arm64_cpp.sh            (BUILD=build/arm64-cpp JOBS=2 by default)
#
# Needs g++-aarch64-linux-gnu and qemu-user (Debian/Ubuntu).  Incremental: a second run rebuilds
# only what changed.  Exits non-zero on the first failing stage.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build/arm64-cpp}
JOBS=${JOBS:-2}
TOOLCHAIN="$PWD/.ci/aarch64-toolchain.cmake"
# PREFIX: an existing aarch64 install of the library (e.g. .ci/arm64.sh's build/arm64-pkg, which
# carries the C++ library and its CMake package as the wheel does): the library is not rebuilt.
PREFIX=${PREFIX:-}

for tool in aarch64-linux-gnu-g++ qemu-aarch64 cmake ctest; do
  if ! command -v "$tool" > /dev/null; then
    echo "arm64_cpp: $tool not found (apt-get install g++-aarch64-linux-gnu qemu-user cmake)" >&2
    exit 1
  fi
done

T_ALL=$SECONDS
stage() { # stage NAME COMMAND...: run, then print how long it took
  local name=$1 t=$SECONDS
  shift
  echo "== arm64 C++: $name"
  "$@"
  echo "== arm64 C++: $name: $((SECONDS - t)) s"
}

if [ -z "$PREFIX" ]; then
  PREFIX="$PWD/$BUILD/prefix"
  stage "configure the library (aarch64 cross toolchain)" \
    cmake -S . -B "$BUILD/lib" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" --log-level=WARNING
  stage "build the library" cmake --build "$BUILD/lib" -j "$JOBS"
  stage "install the library" cmake --install "$BUILD/lib" > /dev/null
else
  echo "== arm64 C++: the library installed in $PREFIX"
fi
stage "configure tests/cpp against the install" \
  cmake -S tests/cpp -B "$BUILD/tests" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" \
  -DCMAKE_BUILD_TYPE=Release -Dmlmath_native_DIR="$PREFIX/mlmath_native/share/cmake/mlmath_native" \
  --log-level=WARNING
stage "build tests/cpp" cmake --build "$BUILD/tests" -j "$JOBS"
# The emulator comes from the toolchain file (CMAKE_CROSSCOMPILING_EMULATOR): ctest runs every
# test as qemu-aarch64 -L <sysroot> test_kernels FAMILY.
stage "ctest under qemu, default ISA (neon)" \
  env -u MLMATH_NATIVE_ISA ctest --test-dir "$BUILD/tests" --output-on-failure -j "$JOBS"
stage "ctest under qemu, MLMATH_NATIVE_ISA=scalar" \
  env MLMATH_NATIVE_ISA=scalar ctest --test-dir "$BUILD/tests" --output-on-failure -j "$JOBS"
echo "== arm64 C++: all stages passed in $((SECONDS - T_ALL)) s"
