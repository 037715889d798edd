#!/usr/bin/env bash
# Install edgecomp and everything it needs on a fresh Debian 12 machine (run as root, or with sudo).
#   apt: the aarch64 cross toolchain that links arm64 bundles, and what firmware outputs
#        (--emit firmware) are built and checked with: g++ for both machines, cmake, make, libzstd;
#        the armv7 cross toolchain (armv7 bundles); clang-14, whose OpenCL C front end compiles the
#        OpenCL kernels of adreno/mali bundles at build time (CUDA's: nvcc, from the CUDA toolkit)
#   pip: edgecomp (editable) with its test dependencies; TVM and friends come from PyPI
# Idempotent: rerunning only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross g++ g++-aarch64-linux-gnu cmake make libzstd-dev
              gcc-arm-linux-gnueabihf libc6-dev-armhf-cross clang-14)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
echo "setup: installing edgecomp with pip ($("$PYTHON" --version))"
"$PYTHON" -m pip install --disable-pip-version-check -q -e ".[test]"
echo "setup: done ($(edgecomp --version))"
