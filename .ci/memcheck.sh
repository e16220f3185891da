#!/usr/bin/env bash
# valgrind memcheck over a short representative workload (tests/memcheck_workload.py).
#
#   bash .ci/memcheck.sh
#
# Uses the installed mlmath_native when `import mlmath_native` works outside the source tree
# and its extension is not an ASan build; otherwise (or with MLMATH_MEMCHECK_BUILD=1) builds
# the extension normally (CMake + Ninja, RelWithDebInfo, no sanitizer) into build/memcheck and
# runs a private copy of the package around it (python/mlmath_native is never touched).
#
# Python runs with PYTHONMALLOC=malloc, so that memcheck sees every Python allocation.  Every
# memcheck error is written to an XML log; the script fails if any error has a frame in our
# extension (_core*.so), whatever its kind (invalid read/write, uninitialised value, bad free,
# overlapping copy, ...).  Errors whose stacks lie wholly in CPython, NumPy or the C runtime are
# listed as warnings only: they are not ours to fix.  Leak checking is off (CPython and NumPy
# keep memory until exit on purpose).  The workload itself must also succeed.
#
# Under valgrind the CPU has no AVX-512 (valgrind 3.19 does not emulate it), so the default run
# dispatches to the best ISA valgrind offers (AVX2 on x86-64); the workload is then run once
# more with MLMATH_NATIVE_ISA=scalar so that the portable kernels are checked too.
# Environment: PYTHON, MLMATH_MEMCHECK_BUILD=1 (always build), MLMATH_MEMCHECK_BUILD_DIR
# (default build/memcheck), MLMATH_MEMCHECK_ISAS (default "default scalar"),
# MLMATH_MEMCHECK_VALGRIND_ARGS (extra valgrind arguments, e.g. --track-origins=yes).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# The interpreter itself, not a wrapper script (pyenv's shims are bash scripts that exec it).
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
BUILD=${MLMATH_MEMCHECK_BUILD_DIR:-$ROOT/build/memcheck}
command -v valgrind >/dev/null || { echo "memcheck.sh: valgrind is not installed" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlmath-memcheck.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The installed package, if there is one that is not a sanitizer build (an ASan build cannot
# run under valgrind).  Checked from $WORK so that the source tree is not on sys.path.
installed=$(cd "$WORK" && "$PY" -c "import mlmath_native._core as c; print(c.__file__)" \
  2>/dev/null || true)
if [ -z "${MLMATH_MEMCHECK_BUILD:-}" ] && [ -n "$installed" ] &&
  ! grep -q __asan_init "$installed"; then
  echo "== using the installed extension: $installed"
else
  VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
  if ! "$PY" -c "import pybind11" 2>/dev/null; then
    echo "== pybind11 (a build requirement) is missing: installing it"
    "$PY" -m pip install --quiet "pybind11>=2.13"
  fi
  echo "== configure + build ($BUILD)"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMLMATH_NATIVE_PYTHON=ON \
    -DSKBUILD_PROJECT_VERSION="$VERSION" \
    -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    -DPython_EXECUTABLE="$PY"
  cmake --build "$BUILD" --target _core
  shopt -s nullglob
  so=("$BUILD"/_core*.so)
  shopt -u nullglob
  [ "${#so[@]}" -eq 1 ] || { echo "memcheck.sh: expected one _core*.so in $BUILD" >&2; exit 1; }
  if grep -q __asan_init "${so[0]}"; then
    echo "memcheck.sh: $BUILD holds a sanitizer build; use another build dir" >&2
    exit 2
  fi
  mkdir -p "$WORK/site"
  cp -R python/mlmath_native "$WORK/site/"
  find "$WORK/site" \( -name '_core*.so' -o -name '_core*.pyd' -o -name __pycache__ \) \
    -prune -exec rm -rf {} +
  cp "${so[0]}" "$WORK/site/mlmath_native/"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONMALLOC=malloc
export OMP_NUM_THREADS=2
# Idle OpenMP workers sleep instead of spinning: valgrind runs one thread at a time, and a
# spinning worker only burns the time slices of the thread that does the work.
export OMP_WAIT_POLICY=PASSIVE

# The XML report is the record; the text output is kept short (the XML is summarised below).
read -r -a extra <<<"${MLMATH_MEMCHECK_VALGRIND_ARGS:-}"
status=0
for isa in ${MLMATH_MEMCHECK_ISAS:-default scalar}; do
  xml="$WORK/memcheck-$isa.xml"
  echo "== valgrind memcheck, ISA: $isa"
  rc=0
  (
    if [ "$isa" != default ]; then export MLMATH_NATIVE_ISA=$isa; fi
    valgrind --tool=memcheck --error-exitcode=99 --leak-check=no --num-callers=40 \
      --xml=yes --xml-file="$xml" "${extra[@]}" \
      "$PY" tests/memcheck_workload.py
  ) || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ]; then
    echo "memcheck.sh: the workload failed under valgrind (exit status $rc)" >&2
    status=1
  fi
  # Fails (exit 1) if an error has a frame in _core; errors elsewhere are printed as warnings.
  "$PY" - "$xml" <<'EOF' || status=1
import re
import sys
import xml.etree.ElementTree as ET

ours = re.compile(r"(^|/)_core[^/]*\.(so|pyd)$|(^|/)src/cpp/")
root = ET.parse(sys.argv[1]).getroot()
counts = {e.findtext("name"): int(e.findtext("count")) for e in root.iter("pair")}
bad = others = 0
for error in root.iter("error"):
    if (error.findtext("kind") or "").startswith("Leak_"):
        continue  # leaks are out of scope (valgrind lists them in the XML all the same)
    frames = [f for stack in error.findall("stack") for f in stack.findall("frame")]
    where = [
        " ".join(
            x
            for x in (
                f.findtext("fn") or "???",
                (f.findtext("dir", "") + "/" + f.findtext("file", "")).lstrip("/")
                + (":" + f.findtext("line") if f.findtext("line") else ""),
                "(" + (f.findtext("obj") or "?") + ")",
            )
            if x and x != "/"
        )
        for f in frames
    ]
    mine = any(
        ours.search(f.findtext("obj") or "") or ours.search(f.findtext("dir") or "")
        for f in frames
    )
    what = error.findtext("what") or error.findtext("xwhat/text") or ""
    times = counts.get(error.findtext("unique"), 1)
    label = "ERROR in mlmath_native" if mine else "warning (not our code)"
    print(f"{label}: {error.findtext('kind')}: {what} (x{times})")
    for w in where[: 25 if mine else 4]:
        print("    " + w)
    bad += mine
    others += not mine
print(f"memcheck: {bad} distinct error(s) with a frame in our extension, {others} elsewhere")
sys.exit(1 if bad else 0)
EOF
done

if [ "$status" -ne 0 ]; then
  echo "memcheck.sh: FAILED" >&2
  exit "$status"
fi
echo "memcheck.sh: no memcheck error in our code"
