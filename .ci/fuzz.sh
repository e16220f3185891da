#!/usr/bin/env bash
# Coverage-guided fuzzing of the public API with atheris (libFuzzer for Python) against an
# extension built with clang's fuzzer coverage and AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash .ci/fuzz.sh                       # bounded run: FUZZ_SECONDS (default 120) seconds
#   FUZZ_SECONDS=3600 bash .ci/fuzz.sh     # run longer (an hour)
#   FUZZ_SECONDS=0 bash .ci/fuzz.sh        # no time limit: run until a finding or Ctrl-C
#   FUZZ_JOBS=4 FUZZ_SECONDS=3600 bash .ci/fuzz.sh   # 4 fuzzing processes in parallel
#   bash .ci/fuzz.sh -runs=100000          # extra arguments go to libFuzzer
#   bash .ci/fuzz.sh path/to/crash-XXXX    # replay one input (a crash file written by a run)
#
# The harness is tests/fuzz_harness.py: it picks a public function and generates shapes,
# strides (non-contiguous views), dtypes and argument values from the fuzzer's bytes, and checks
# every successful call against mlmath_native.reference.  A finding is a sanitizer report, a
# crash, an unexpected exception type, or a mismatch with the reference; libFuzzer then writes
# the input to $FUZZ_ARTIFACTS/crash-<sha1> and this script exits non-zero.  Replay it with
# `bash .ci/fuzz.sh $FUZZ_ARTIFACTS/crash-<sha1>`, then turn it into a plain pytest case in
# tests/test_fuzz_regressions.py.  New interesting inputs are kept in $FUZZ_CORPUS (default
# build/fuzz-corpus, not tracked) so that a later longer run starts where this one stopped;
# tests/fuzz_corpus/ holds the small tracked seeds.
#
# Build: clang/clang++ (Debian's `clang` package, installed here with apt-get when missing),
# -fsanitize=fuzzer-no-link,address,undefined, into build/fuzz, with MLMATH_NATIVE_OPENMP=OFF:
# clang's libomp is a separate runtime from GCC's libgomp, and its worker threads under the
# ASan runtime that atheris ships are not worth the trouble for a fuzz build (the sanitize.sh
# run covers the OpenMP paths with GCC), and with the scalar kernels only (FUZZ_ISAS, default
# "scalar"; e.g. FUZZ_ISAS="scalar;avx2" adds a path): the instrumented build of every ISA takes
# about 25 minutes on 2 cores, the scalar one about a minute.  The sanitizer runtime is atheris's
# asan_with_fuzzer.so (ASan + UBSan + libFuzzer), preloaded into the interpreter; the UBSan
# `vptr` and `function` checks need the C++ UBSan runtime and are left out.  python/mlmath_native itself is
# never touched: the package is copied to a temporary directory around the instrumented build.
#
# Environment: PYTHON (default python3; needs numpy), FUZZ_SECONDS, FUZZ_SEED and FUZZ_RUNS
# (libFuzzer's -seed and -runs), FUZZ_MISMATCHES (fail, the default, or report), FUZZ_JOBS
# (default 1), FUZZ_ISAS,
# FUZZ_CORPUS, FUZZ_ARTIFACTS (default build/fuzz-artifacts), MLMATH_FUZZ_BUILD_DIR
# (default build/fuzz), MLMATH_FUZZ_ISA (forces MLMATH_NATIVE_ISA in the fuzzed process).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
BUILD=${MLMATH_FUZZ_BUILD_DIR:-$ROOT/build/fuzz}
FUZZ_SECONDS=${FUZZ_SECONDS:-120}
FUZZ_JOBS=${FUZZ_JOBS:-1}
CORPUS=${FUZZ_CORPUS:-$ROOT/build/fuzz-corpus}
ARTIFACTS=${FUZZ_ARTIFACTS:-$ROOT/build/fuzz-artifacts}

VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$VERSION" ] || { echo "fuzz.sh: no version in pyproject.toml" >&2; exit 2; }

if ! command -v clang++ >/dev/null 2>&1; then
  echo "== clang is missing: installing Debian's clang"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang
fi
for mod in pybind11 atheris numpy; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    echo "== $mod is missing: installing it"
    "$PY" -m pip install --quiet "$mod"
  fi
done
PYBIND11_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
ATHERIS_DIR=$("$PY" -c "import atheris; print(atheris.path())")
ASAN_RT="$ATHERIS_DIR/asan_with_fuzzer.so"
[ -e "$ASAN_RT" ] || { echo "fuzz.sh: $ASAN_RT not found (atheris install?)" >&2; exit 2; }

SAN_FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize=vptr,function"
SAN_FLAGS="$SAN_FLAGS -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

echo "== configure + build ($BUILD, clang++, $SAN_FLAGS, OpenMP off)"
start=$(date +%s)
cmake -S "$ROOT" -B "$BUILD" -G Ninja \
  -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMLMATH_NATIVE_OPT_LEVEL=-O1 \
  -DMLMATH_NATIVE_PYTHON=ON \
  -DMLMATH_NATIVE_OPENMP=OFF \
  -DMLMATH_NATIVE_ISAS="${FUZZ_ISAS:-scalar}" \
  -DSKBUILD_PROJECT_VERSION="$VERSION" \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DPython_EXECUTABLE="$PY" \
  -DCMAKE_CXX_FLAGS="$SAN_FLAGS" \
  -DCMAKE_SHARED_LINKER_FLAGS="$SAN_FLAGS" \
  -DCMAKE_MODULE_LINKER_FLAGS="$SAN_FLAGS" >/dev/null
cmake --build "$BUILD" --target _core
echo "   build took $(($(date +%s) - start)) s"

shopt -s nullglob
SO=("$BUILD"/_core*.so)
shopt -u nullglob
[ "${#SO[@]}" -eq 1 ] || { echo "fuzz.sh: expected one _core*.so in $BUILD" >&2; exit 1; }

# A private copy of the package around the instrumented extension.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlmath-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/site" "$CORPUS" "$ARTIFACTS"
cp -R python/mlmath_native "$WORK/site/"
find "$WORK/site" \( -name '_core*.so' -o -name '_core*.pyd' -o -name __pycache__ \) \
  -prune -exec rm -rf {} +
cp "${SO[0]}" "$WORK/site/mlmath_native/"

export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export MLMATH_FUZZ_EXPECT_CORE="$WORK/site"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:detect_stack_use_after_return=1${MLMATH_EXTRA_ASAN_OPTIONS:+:$MLMATH_EXTRA_ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONFAULTHANDLER=1
export PYTHONHASHSEED=0  # repeatable runs (FUZZ_SEED)
[ -z "${MLMATH_FUZZ_ISA:-}" ] || export MLMATH_NATIVE_ISA="$MLMATH_FUZZ_ISA"

ARGS=(-rss_limit_mb=4096 -timeout=20 "-artifact_prefix=$ARTIFACTS/" -print_final_stats=1)
if [ "$#" -gt 0 ] && [ -f "$1" ]; then
  # Replay the given input file(s).
  echo "== replaying $*"
  LD_PRELOAD="$ASAN_RT" "$PY" tests/fuzz_harness.py "${ARGS[@]}" "$@"
  exit
fi
[ "$FUZZ_SECONDS" -gt 0 ] && ARGS+=("-max_total_time=$FUZZ_SECONDS")
# A fixed seed and number of inputs (with an empty corpus) make a run repeatable: CI fuzzes the
# same inputs a local run did, so a new finding cannot fail an unrelated change at random.
[ -n "${FUZZ_SEED:-}" ] && ARGS+=("-seed=$FUZZ_SEED")
[ -n "${FUZZ_RUNS:-}" ] && ARGS+=("-runs=$FUZZ_RUNS")
if [ "$FUZZ_JOBS" -gt 1 ]; then
  ARGS+=("-fork=$FUZZ_JOBS" -ignore_crashes=0)
fi
SEEDS=()
[ -d tests/fuzz_corpus ] && SEEDS+=(tests/fuzz_corpus)

echo "== fuzzing for ${FUZZ_SECONDS}s (0 = unbounded); corpus $CORPUS, findings in $ARTIFACTS"
# FUZZ_MISMATCHES=report: disagreements with the reference are saved and listed, not fatal
# (crashes and sanitizer reports still are); see MISMATCH_DIR in tests/fuzz_harness.py.
if [ "${FUZZ_MISMATCHES:-fail}" = report ]; then
  export MLMATH_FUZZ_MISMATCH_DIR="$ARTIFACTS"
fi
status=0
LD_PRELOAD="$ASAN_RT" "$PY" tests/fuzz_harness.py "${ARGS[@]}" "$@" "$CORPUS" "${SEEDS[@]}" ||
  status=$?
if [ "$status" -ne 0 ]; then
  echo "fuzz.sh: FINDING (exit status $status); inputs in $ARTIFACTS:" >&2
  ls -1 "$ARTIFACTS" >&2 || true
  exit "$status"
fi
if [ -s "$ARTIFACTS/mismatches.txt" ]; then
  echo "fuzz.sh: no crash; disagreements with the reference (replay: bash .ci/fuzz.sh FILE):"
  cat "$ARTIFACTS/mismatches.txt"
else
  echo "fuzz.sh: no finding"
fi
