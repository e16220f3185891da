#!/usr/bin/env bash
# The cibuildwheel configuration builds exactly the intended wheels: for each platform,
# `cibuildwheel --print-build-identifiers` must list what .ci/wheel-identifiers.txt says.
# (No containers are needed for this; the wheels themselves are built by wheels.yml.)
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for platform in linux macos windows; do
  want=$(grep "^${platform}:" .ci/wheel-identifiers.txt | cut -d: -f2 | tr ' ' '\n' | sed '/^$/d' | sort)
  got=$(cibuildwheel --print-build-identifiers --platform "$platform" | sort)
  if [ "$want" != "$got" ]; then
    echo "cibuildwheel identifiers for $platform differ from .ci/wheel-identifiers.txt:"
    diff <(echo "$want") <(echo "$got") || true
    status=1
  else
    echo "$platform: $(echo "$got" | wc -l) wheels, as intended"
  fi
done
exit $status
