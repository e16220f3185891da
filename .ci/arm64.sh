#!/usr/bin/env bash
# The Python kernel tests on emulated arm64 (issue 19), called by .ci/run; by hand:
# `bash .ci/arm64.sh [extra pytest arguments]` (as root, or with sudo for apt-get).
#
# 1. An arm64 Debian 12 root file system in build/arm64-rootfs made from Debian's own packages
#    without running arm64 code: `debootstrap --download-only` resolves and fetches the packages,
#    `dpkg-deb -x` unpacks each of them; the maintainer scripts never run, so the few things they
#    would do that the tests need are done here (the BLAS/LAPACK alternatives, byte-compiling).
#    It is kept and reused while its package list is the same.
# 2. The extension `_core` cross-built with aarch64-linux-gnu-g++ from the top-level
#    CMakeLists.txt (.ci/aarch64-toolchain.cmake) against the root file system's Python 3.11,
#    installed as pip would lay it out (cmake --install) beside the package's Python sources.
# 3. python3.11 of the root file system under qemu-aarch64, without binfmt_misc: the binary is
#    renamed python3.11.aarch64 and python3.11 becomes a host shell script that starts it under
#    qemu with its own path as argv[0], so sys.executable is that script and the tests'
#    subprocesses ([sys.executable, "-c", ...], multiprocessing's spawn) start arm64 Pythons too.
#    The kernel tests run once with the default ISA and once with MLMATH_NATIVE_ISA=scalar.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

ROOTFS=${ARM64_ROOTFS:-$REPO/build/arm64-rootfs}
BUILD=$REPO/build/arm64-python  # the cross build of _core
PKG=$REPO/build/arm64-pkg       # the importable package (what pip puts in site-packages)
SITE=$REPO/build/arm64-site     # aarch64 wheels from PyPI for what Debian 12 does not package
PYBIND11=$REPO/build/arm64-pybind11
HOST_PYTHON=${HOST_PYTHON:-python3}  # a host Python with pip (CI: the venv of .ci/run)

SUITE=bookworm
# The emulated system: Debian's Python 3.11 with its headers, NumPy, the test tools, SciPy
# (scipy.signal is a second oracle in the convolution tests), threadpoolctl and GCC's OpenMP.
PACKAGES=python3,python3-dev,python3-numpy,python3-pytest,python3-hypothesis,python3-scipy
PACKAGES+=,python3-threadpoolctl,python3-pytest-xdist,libgomp1
# bfloat16 arrays (tests/sixteen.py) need ml_dtypes, which Debian 12 does not package; 0.5.1 is
# the newest release whose aarch64 wheel is known to work with Debian 12's NumPy 1.24.
ML_DTYPES=ml_dtypes==0.5.1
ROOTFS_ID="$SUITE $PACKAGES format-1"

# The kernel-correctness files: comparisons with the references, tails and extremes, 16-bit
# storage, bad input, dispatch and the thread-count bitwise checks.  Left out: files that skip
# as a whole without torch, jax or dask (test_interop*, test_16bit_interop, test_optim_params,
# test_dask, test_16bit_dask), files that time things or build/run x86 tools (test_bench,
# test_cpp_package, test_typing, test_doc_examples, test_demos, test_ecosystem), test_memory (RSS
# of 10,000 calls: qemu's own memory is counted) and test_reference (the float64 references
# against SciPy: no kernel involved, the same on every CPU).
# ARM64_TEST_FILES (space-separated) replaces the list.
SIXTEEN_BIT_FILES=(
  tests/test_16bit_conversions.py
  tests/test_16bit_softmax.py
  tests/test_16bit_cross_entropy.py
  tests/test_16bit_optim.py
  tests/test_16bit_matmul.py
  tests/test_16bit_conv.py
  tests/test_16bit_attention.py
  tests/test_optim_int8.py
)
TEST_FILES=(
  tests/test_softmax.py
  tests/test_cross_entropy.py
  tests/test_optim.py
  tests/test_matmul.py
  tests/test_conv.py
  tests/test_conv_padding.py
  tests/test_conv_nonfinite.py
  tests/test_attention.py
  # the options of issue 22 on the NEON path (the vector tanh, the band, sinks, a cache's
  # kv_len, 16-bit storage); the rest of that file is the same arithmetic on more shapes
  tests/test_attention_options.py::test_window_block_tails
  tests/test_attention_options.py::test_softcap
  tests/test_attention_options.py::test_sinks
  tests/test_attention_options.py::test_16bit_storage_computes_in_float32
  tests/test_attention_options.py::test_kv_len_equals_the_sliced_cache_bit_for_bit
  # the decode path (Note [decode]): dot products, value tiles, the chunk merge, 16-bit loads
  tests/test_attention_decode.py::test_decode_against_the_reference
  tests/test_attention_decode.py::test_16bit_decode_computes_in_float32
  tests/test_attention_decode.py::test_threads_do_not_change_decode_results
  "${SIXTEEN_BIT_FILES[@]}"
  tests/test_bad_input.py
  tests/test_bad_input_matrix.py
  tests/test_fuzz_regressions.py
  tests/test_output_cache.py
  tests/test_dispatch.py
  tests/test_reliability.py
)
if [ -n "${ARM64_TEST_FILES:-}" ]; then read -r -a TEST_FILES <<< "$ARM64_TEST_FILES"; fi
# The forced-scalar run: the scalar path is the same source that every x86 run of .ci/run also
# tests in full; here it checks the arm64 build of it on every family's reference comparisons,
# tails, extremes and 16-bit storage (about a third of the default run's time, to fit CI).
# ARM64_SCALAR_TEST_FILES (space-separated) replaces the list.
SCALAR_TEST_FILES=(
  tests/test_softmax.py
  tests/test_cross_entropy.py
  tests/test_matmul.py
  tests/test_conv.py
  "${SIXTEEN_BIT_FILES[@]}"
  tests/test_dispatch.py
)
if [ -n "${ARM64_SCALAR_TEST_FILES:-}" ]; then
  read -r -a SCALAR_TEST_FILES <<< "$ARM64_SCALAR_TEST_FILES"
fi
# Tests left out, each with its reason (printed before the runs).  ARM64_ALL_TESTS=1 keeps them.
DESELECT=(
  "tests/test_reliability.py::test_ctrl_c_stops_a_long_kernel"
  "tests/test_attention.py::test_long_sequence_memory"
  "tests/test_reliability.py::test_exit_while_daemon_threads_run_kernels"
)
DESELECT_REASONS=(
  "times a call against wall-clock limits (an answer within 2 s, a 6 s call): under emulation the\
 single unit it calibrates on takes minutes; qemu timings mean nothing"
  "a peak-memory check of one L = 16384 attention (ru_maxrss), several minutes under qemu; the\
 arithmetic is that of the shorter attention tests"
  "interpreter shutdown with daemon threads inside kernels (the Python runtime's behaviour, not\
 the kernels' arithmetic), about 2 minutes under qemu"
)
declare -A STAGE_SECONDS
STAGES=()
stage_start() {
  echo "== arm64: $1"
  STAGE_NAME=$1
  STAGE_T0=$SECONDS
}
stage_end() {
  STAGE_SECONDS[$STAGE_NAME]=$((SECONDS - STAGE_T0))
  STAGES+=("$STAGE_NAME")
  echo "   ${STAGE_SECONDS[$STAGE_NAME]} s"
}

# --- host tools -------------------------------------------------------------------------------
missing=()
command -v aarch64-linux-gnu-g++ > /dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 > /dev/null || command -v qemu-aarch64-static > /dev/null ||
  missing+=(qemu-user)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  echo "== arm64: apt-get install ${missing[*]}"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q > /dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null
fi
QEMU=$(command -v qemu-aarch64 || command -v qemu-aarch64-static)
command -v cmake > /dev/null || "$HOST_PYTHON" -m pip install --quiet "cmake>=3.18"
GENERATOR=()
command -v ninja > /dev/null && GENERATOR=(-G Ninja)

# The Debian archive this host's apt uses (its first ".../debian" URI), or $ARM64_DEBIAN_MIRROR.
debian_mirror() {
  local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
  { cat "${files[@]}" 2> /dev/null || true; } | grep -v '^\s*#' |
    grep -oE '(https?|file):/+[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ' || true
}

# --- 1. the root file system ------------------------------------------------------------------
stage_start "root file system ($ROOTFS)"
if [ -f "$ROOTFS/.mlmath-rootfs" ] && [ "$(cat "$ROOTFS/.mlmath-rootfs")" = "$ROOTFS_ID" ]; then
  echo "   reused (same package list)"
else
  MIRROR=${ARM64_DEBIAN_MIRROR:-$(debian_mirror)}
  if [ -z "$MIRROR" ]; then
    echo "no Debian archive in /etc/apt/sources*; set ARM64_DEBIAN_MIRROR" >&2
    exit 1
  fi
  rm -rf "$ROOTFS" "$ROOTFS.partial"
  mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --download-only --arch=arm64 --variant=minbase --include="$PACKAGES" \
    "$SUITE" "$ROOTFS.partial" "$MIRROR" > "$ROOTFS.log" 2>&1 ||
    { tail -n 30 "$ROOTFS.log"; exit 1; }
  debs=("$ROOTFS.partial"/var/cache/apt/archives/*.deb)
  echo "   ${#debs[@]} packages, $(du -cm "${debs[@]}" | tail -n 1 | cut -f1) MiB"
  for deb in "${debs[@]}"; do
    dpkg-deb -x "$deb" "$ROOTFS.partial"
  done
  rm -f "${debs[@]}"
  # What the maintainer scripts would have done: the BLAS/LAPACK alternatives that NumPy links
  # against, and byte-compiled modules (compiled here by the host's Python, natively: the .pyc
  # format depends on the Python version only, and both are 3.11; saves minutes under qemu).
  lib=$ROOTFS.partial/usr/lib/aarch64-linux-gnu
  ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
  ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"
  if [ "$("$HOST_PYTHON" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
    "$HOST_PYTHON" -m compileall -q -j 2 -s "$ROOTFS.partial" -p / \
      "$ROOTFS.partial/usr/lib/python3.11" "$ROOTFS.partial/usr/lib/python3/dist-packages" \
      > /dev/null || true  # a module that does not compile is not one that the tests import
  fi
  mv "$ROOTFS.partial/usr/bin/python3.11" "$ROOTFS.partial/usr/bin/python3.11.aarch64"
  echo "$ROOTFS_ID" > "$ROOTFS.partial/.mlmath-rootfs"
  mv "$ROOTFS.partial" "$ROOTFS"
fi
# Written on every run: it holds absolute paths.
PY=$ROOTFS/usr/bin/python3.11
cat > "$PY" << EOF
#!/bin/sh
# Written by .ci/arm64.sh: the aarch64 python3.11 beside this file, under qemu-user.
exec "$QEMU" -L "$ROOTFS" -0 "$PY" "$PY.aarch64" "\$@"
EOF
chmod +x "$PY"
"$PY" -c "import platform, sys; print('  ', platform.machine(), sys.version.split()[0], sys.executable)"
stage_end

stage_start "aarch64 wheels ($ML_DTYPES) and the pybind11 headers"
if [ ! -f "$SITE/.id" ] || [ "$(cat "$SITE/.id")" != "$ML_DTYPES" ]; then
  rm -rf "$SITE"
  "$HOST_PYTHON" -m pip install --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    --target "$SITE" "$ML_DTYPES"
  echo "$ML_DTYPES" > "$SITE/.id"
fi
if [ ! -d "$PYBIND11/pybind11" ]; then
  # the build requirement of pyproject.toml; header-only, so the host's wheel serves arm64
  "$HOST_PYTHON" -m pip install --quiet --target "$PYBIND11" "pybind11>=2.13"
fi
stage_end

# --- 2. the cross build -----------------------------------------------------------------------
stage_start "cross build of _core for aarch64"
VERSION=$("$HOST_PYTHON" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
# -idirafter: Debian's python3.11/pyconfig.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>
# from the root file system's /usr/include, searched after the cross toolchain's own headers.
cmake -S . -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_TOOLCHAIN_FILE="$REPO/.ci/aarch64-toolchain.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DMLMATH_NATIVE_PYTHON=ON -DSKBUILD_PROJECT_VERSION="$VERSION" \
  -DPython_EXECUTABLE="$PY" -DPython_INCLUDE_DIR="$ROOTFS/usr/include/python3.11" \
  -Dpybind11_DIR="$PYBIND11/pybind11/share/cmake/pybind11" \
  -DCMAKE_CXX_FLAGS="-idirafter $ROOTFS/usr/include" > "$BUILD.configure.log" 2>&1 ||
  { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j 2
rm -rf "$PKG"
cmake --install "$BUILD" --prefix "$PKG" > /dev/null
cp -r python/mlmath_native/. "$PKG/mlmath_native/"
stage_end

# --- 3. the tests under qemu ------------------------------------------------------------------
# pytest-xdist workers: one per core (qemu-user runs each guest thread on a host thread)
WORKERS=${ARM64_PYTEST_WORKERS:-$(nproc)}
export PYTHONPATH=$PKG:$SITE
# the deadlock limit of tests/test_reliability.py's thread test, for a 20-50 times slower CPU
export MLMATH_TEST_TIMEOUT_SCALE=10
unset PYTHONHOME
# NumPy 1.24 (Debian 12) has no common type of bfloat16 and float16: np.result_type raises
# TypeError, and so the package does; the tests of that promotion expect NumPy's newer float32.
if ! "$PY" -c "import ml_dtypes, numpy as np; np.result_type(ml_dtypes.bfloat16, np.float16)" \
  2> /dev/null; then
  numpy_version=$("$PY" -c "import numpy; print(numpy.__version__)")
  for t in tests/test_16bit_softmax.py::test_mixed_dtypes_promote_as_numpy_does \
    "tests/test_16bit_attention.py::test_mixed_dtypes_promote_as_numpy_does[bfloat16]" \
    tests/test_16bit_matmul.py::test_mixed_dtypes_follow_result_type \
    tests/test_16bit_conv.py::test_mixed_dtypes_follow_result_type; do
    DESELECT+=("$t")
    DESELECT_REASONS+=("NumPy $numpy_version cannot promote bfloat16 with float16, the test expects float32")
  done
fi
if [ "${ARM64_ALL_TESTS:-0}" = 1 ]; then DESELECT=(); fi
for i in "${!DESELECT[@]}"; do
  echo "   deselected: ${DESELECT[$i]} (${DESELECT_REASONS[$i]})"
done
deselect_args=()
for t in "${DESELECT[@]}"; do deselect_args+=(--deselect "$t"); done

for isa in default scalar; do
  stage_start "tests, ISA $isa (python3.11 under $(basename "$QEMU"))"
  if [ "$isa" = default ]; then unset MLMATH_NATIVE_ISA; else export MLMATH_NATIVE_ISA=$isa; fi
  "$PY" -c "import mlmath_native as mn; print(mn.build_info()); print('from', mn.__file__)"
  junit=$REPO/build/arm64-junit-$isa.xml
  status=0
  files=("${TEST_FILES[@]}")
  if [ "$isa" = scalar ]; then files=("${SCALAR_TEST_FILES[@]}"); fi
  "$PY" -m pytest "${files[@]}" -q -p no:cacheprovider -n "$WORKERS" "${deselect_args[@]}" \
    --junitxml="$junit" "$@" || status=$?
  stage_end
  # Seconds per file (summed over the workers), to choose what fits CI's time
  "$HOST_PYTHON" - "$junit" << 'EOF'
import collections, sys, xml.etree.ElementTree as ET
secs, counts = collections.Counter(), collections.defaultdict(collections.Counter)
for case in ET.parse(sys.argv[1]).iter("testcase"):
    name = case.get("classname", "").split(".")[-1] + ".py"
    secs[name] += float(case.get("time", 0))
    kind = next((c.tag for c in case if c.tag in ("skipped", "failure", "error")), "passed")
    counts[name][kind] += 1
print("   seconds  file (test time summed over the workers; passed/skipped/failed)")
for name, t in secs.most_common():
    c = counts[name]
    print(f"   {t:7.1f}  {name} ({c['passed']}/{c['skipped']}/{c['failure'] + c['error']})")
EOF
  [ "$status" = 0 ] || exit "$status"
done
unset MLMATH_NATIVE_ISA

echo "== arm64: seconds per stage"
for s in "${STAGES[@]}"; do printf '   %5d  %s\n' "${STAGE_SECONDS[$s]}" "$s"; done
