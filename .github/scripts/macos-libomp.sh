#!/usr/bin/env bash
# LLVM's OpenMP runtime for the wheels' macOS deployment target (11.0), as a universal2 build,
# into /usr/local/openmp (include/ and lib/), where CMake's FindOpenMP finds it through
# OpenMP_ROOT.  The R project publishes these builds for exactly this purpose; the file is
# pinned by version (its checksum is printed in the build log: record it in SHA256 below on the
# first release build, which then checks it).
set -euo pipefail
VERSION=17.0.6
FILE=openmp-${VERSION}-darwin20-Release.tar.gz
SHA256=""  # not yet recorded: this workplace cannot reach mac.r-project.org
curl -fsSL -o "/tmp/${FILE}" "https://mac.r-project.org/openmp/${FILE}"
shasum -a 256 "/tmp/${FILE}"
if [ -n "${SHA256}" ]; then
  echo "${SHA256}  /tmp/${FILE}" | shasum -a 256 -c -
fi
sudo mkdir -p /usr/local/openmp
# the archive holds usr/local/{include,lib}
sudo tar -xzf "/tmp/${FILE}" -C /usr/local/openmp --strip-components=2
ls -R /usr/local/openmp
