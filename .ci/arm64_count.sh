#!/usr/bin/env bash
# Guest instructions per element under qemu-aarch64, NEON vs scalar (issue 19: timings under
# qemu mean nothing, instruction counts do).  For each kernel, .ci/arm64_count/count_driver runs
# one call between two getppid() markers (after an uncounted warm-up call at the same size) and
# qemu-aarch64 -d nochain,exec,in_asm,strace logs every executed translation block;
# .ci/arm64_count/count_insns.awk sums their lengths between the markers, streaming (no log is
# stored).  The count is exact: it matches qemu -singlestep (one logged block per instruction) on
# every kernel (VALIDATE=1 checks that on small sizes).
#
#   bash .ci/arm64_count.sh        (after .ci/arm64_cpp.sh, whose install prefix it links)
#
# Columns: "scalar" is the scalar ISA of the library as built (GCC -O3: the compiler
# auto-vectorises its loops with Advanced SIMD, which is baseline on aarch64 -- what an arm64
# wheel without the NEON path runs); "1-lane" is the same scalar source built with
# -fno-tree-vectorize -fno-tree-slp-vectorize (ONE_LANE=1, a scalar-only library: one lane, no
# FMA, the issue's description of the scalar path).  The target is the issue's ratio.
#
# Environment: BUILD (default build/arm64-cpp: .ci/arm64_cpp.sh's build), PREFIX (the library's
# install prefix, default $BUILD/prefix), OUT (default build/arm64-count), ONE_LANE (default 1),
# VALIDATE (default 0), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build/arm64-cpp}
OUT=${OUT:-build/arm64-count}
ONE_LANE=${ONE_LANE:-1}
VALIDATE=${VALIDATE:-0}
JOBS=${JOBS:-2}
TOOLCHAIN="$PWD/.ci/aarch64-toolchain.cmake"
SYSROOT=/usr/aarch64-linux-gnu
CMAKE_DIR_IN_PREFIX=mlmath_native/share/cmake/mlmath_native
T_ALL=$SECONDS

for tool in aarch64-linux-gnu-g++ qemu-aarch64 cmake cc mawk; do
  if ! command -v "$tool" > /dev/null; then
    echo "arm64_count: $tool not found" >&2
    exit 1
  fi
done

# The library: .ci/arm64_cpp.sh's install (library only if it has not run).
PREFIX=${PREFIX:-$PWD/$BUILD/prefix}
if [ ! -d "$PREFIX/$CMAKE_DIR_IN_PREFIX" ]; then
  echo "== arm64 count: building the library into $PREFIX"
  cmake -S . -B "$BUILD/lib" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" --log-level=WARNING
  cmake --build "$BUILD/lib" -j "$JOBS"
  cmake --install "$BUILD/lib" > /dev/null
fi

build_driver() { # build_driver DIR PREFIX: the driver against the library installed in PREFIX
  cmake -S .ci/arm64_count -B "$1" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" \
    -DCMAKE_BUILD_TYPE=Release -Dmlmath_native_DIR="$2/$CMAKE_DIR_IN_PREFIX" --log-level=WARNING
  cmake --build "$1" -j "$JOBS" > /dev/null
}

echo "== arm64 count: building the driver"
mkdir -p "$OUT"
cc -O2 -shared -fPIC .ci/arm64_count/unbuffered_log.c -o "$OUT/unbuffered_log.so" -ldl
build_driver "$OUT/driver" "$PREFIX"
DRIVER="$OUT/driver/count_driver"
if [ "$ONE_LANE" = 1 ]; then
  ONE_PREFIX="$PWD/$OUT/scalar1/prefix"
  if [ ! -d "$ONE_PREFIX/$CMAKE_DIR_IN_PREFIX" ]; then
    echo "== arm64 count: building the one-lane scalar library (scalar ISA only, no auto-vectorisation)"
  fi
  # Incremental after the first run (a few minutes at -j2 the first time).
  cmake -S . -B "$OUT/scalar1" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
    -DMLMATH_NATIVE_ISAS=scalar "-DCMAKE_CXX_FLAGS=-fno-tree-vectorize -fno-tree-slp-vectorize" \
    -DCMAKE_INSTALL_PREFIX="$ONE_PREFIX" --log-level=WARNING
  cmake --build "$OUT/scalar1" -j "$JOBS" > /dev/null
  cmake --install "$OUT/scalar1" > /dev/null
  build_driver "$OUT/driver-scalar1" "$ONE_PREFIX"
fi

# count DRIVER KERNEL SIZE ISA: guest instructions of the one counted call
count() {
  local out
  out=$(LD_PRELOAD="$PWD/$OUT/unbuffered_log.so" qemu-aarch64 -U LD_PRELOAD -L "$SYSROOT" \
    -d nochain,exec,in_asm,strace -D /dev/stdout "$@" | mawk -f .ci/arm64_count/count_insns.awk)
  set -- $out
  if [ "$3" != 0 ] || [ "$4" -lt 2 ]; then
    echo "arm64_count: bad log ($3 blocks of unknown length, $4 markers)" >&2
    exit 1
  fi
  echo "$1"
}
# count_singlestep DRIVER KERNEL SIZE ISA: the same, one logged block per instruction
count_singlestep() {
  LD_PRELOAD="$PWD/$OUT/unbuffered_log.so" qemu-aarch64 -U LD_PRELOAD -L "$SYSROOT" -singlestep \
    -d nochain,exec,strace -D /dev/stdout "$@" |
    mawk '/ getppid\(/ { m++; next } /^Trace/ { if (m == 1) c++ } END { print c + 0 }'
}
units() { qemu-aarch64 -L "$SYSROOT" "$DRIVER" "$1" "$2" scalar | mawk '{ print $6 }'; }

if [ "$VALIDATE" = 1 ]; then
  echo "== arm64 count: block counts against -singlestep (small sizes)"
  for args in "softmax 1" "cross_entropy 1" "adam 1000" "matmul 24" "conv2d 8" "attention 16"; do
    for isa in scalar neon; do
      a=$(count "$DRIVER" $args $isa)
      b=$(count_singlestep "$DRIVER" $args $isa)
      echo "  $args $isa: blocks $a, singlestep $b"
      [ "$a" = "$b" ] || { echo "arm64_count: counts differ" >&2; exit 1; }
    done
  done
fi

MARKERS=$(count "$DRIVER" none 0 scalar) # the markers' own instructions, subtracted below
echo "== arm64 count: guest instructions per unit (marker overhead $MARKERS subtracted)"
printf '%-14s %-22s %-9s %9s %9s %7s %9s %7s %7s\n' kernel size unit scalar neon ratio \
  1-lane ratio target
row() { # row KERNEL SIZE LABEL UNIT TARGET
  local t=$SECONDS n s v o="-" r1="-"
  n=$(units "$1" "$2")
  s=$(count "$DRIVER" "$1" "$2" scalar)
  v=$(count "$DRIVER" "$1" "$2" neon)
  if [ "$ONE_LANE" = 1 ]; then
    o=$(count "$OUT/driver-scalar1/count_driver" "$1" "$2" scalar)
  fi
  mawk -v k="$1" -v l="$3" -v u="$4" -v g="$5" -v n="$n" -v s="$s" -v v="$v" -v o="$o" \
    -v z="$MARKERS" -v t=$((SECONDS - t)) 'BEGIN {
      s = (s - z) / n; v = (v - z) / n
      if (o != "-") { o = (o - z) / n; ro = sprintf("%.3f", v / o); o = sprintf("%.3f", o) }
      else ro = "-"
      printf "%-14s %-22s %-9s %9.3f %9.3f %7.3f %9s %7s %7s  (%d s)\n", k, l, u, s, v, v / s,
        o, ro, "<=" g, t
    }'
}
row softmax 64 "64 x 4096" element 0.35
row softmax_bf16 64 "64 x 4096 bf16" element 0.35
row cross_entropy 64 "64 x 8192, grad" logit 0.35
row adam 1048576 "AdamW 1M params" param 0.35
row matmul 256 "256^3" mul-add 0.2
row conv2d 32 "1x32x32x32 K32 3x3" mul-add 0.2
row attention 256 "B1 H2 L256 D64" mul-add 0.2
echo "== arm64 count: done in $((SECONDS - T_ALL)) s"
