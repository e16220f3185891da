"""Build check (run by .ci/run, not by pytest): no inline function or template instance is shared
between the per-ISA copies of the kernels.

Note [inline functions across ISAs] in src/cpp/common/isa.h: a weak symbol defined in two ISA
object files is merged by the linker, and the copy that survives may hold AVX-512 instructions
that then run on the baseline path of a CPU without them.  This lists the weak symbols of each
ISA's objects (with nm) and fails if two ISAs define the same one.

    python tests/check_isa_symbols.py BUILD_DIR
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

IGNORED = {"DW.ref.__gxx_personality_v0"}  # exception-handling glue, identical everywhere


def weak_symbols(objects: list[pathlib.Path]) -> set[str]:
    out = subprocess.run(
        ["nm", "--defined-only", *map(str, objects)], capture_output=True, text=True, check=True
    ).stdout
    symbols = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "WVu":
            symbols.add(parts[2])
    return symbols - IGNORED


def main(build_dir: str) -> int:
    per_isa = {}
    for target in sorted(pathlib.Path(build_dir).rglob("mlmath_kernels_*.dir")):
        isa = target.name.removeprefix("mlmath_kernels_").removesuffix(".dir")
        objects = sorted(target.rglob("*.o")) or sorted(target.rglob("*.obj"))
        if objects:
            per_isa[isa] = weak_symbols(objects)
    if len(per_isa) < 2:
        print(f"check_isa_symbols: found {sorted(per_isa)} under {build_dir}; need 2+ ISAs")
        return 1
    shared = {}
    names = sorted(per_isa)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for sym in per_isa[a] & per_isa[b]:
                shared.setdefault(sym, []).append(f"{a}/{b}")
    for sym, pairs in sorted(shared.items()):
        print(f"shared weak symbol {sym} in {', '.join(pairs)}")
    print(f"check_isa_symbols: {len(names)} ISAs ({', '.join(names)}), {len(shared)} shared")
    return 1 if shared else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build"))
