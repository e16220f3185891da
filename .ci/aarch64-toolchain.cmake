# Cross build for Linux aarch64 on an x86-64 Debian host (g++-aarch64-linux-gnu, qemu-user):
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=.ci/aarch64-toolchain.cmake
# Test programs (ctest, try_run) run through qemu-aarch64 with the cross toolchain's sysroot.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(MLMATH_AARCH64_PREFIX "aarch64-linux-gnu" CACHE STRING "Cross toolchain prefix")
set(MLMATH_AARCH64_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "Target libraries for qemu -L")
set(CMAKE_C_COMPILER ${MLMATH_AARCH64_PREFIX}-gcc)
set(CMAKE_CXX_COMPILER ${MLMATH_AARCH64_PREFIX}-g++)
set(CMAKE_CROSSCOMPILING_EMULATOR "qemu-aarch64;-L;${MLMATH_AARCH64_SYSROOT}")

# Libraries and headers from the target side only; programs (cmake, python) from the host.
set(CMAKE_FIND_ROOT_PATH ${MLMATH_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
