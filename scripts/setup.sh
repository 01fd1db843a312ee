#!/usr/bin/env bash
# setup.sh — installs what nrlua needs (Debian packages) and builds it into build/.
# Idempotent: packages already installed are skipped, the build is incremental.
# Env: NR_BUILD_DIR (default build), NR_CMAKE_ARGS (extra cmake arguments), NR_SKIP_APT=1.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake pkg-config luajit libluajit-5.1-dev lua-busted lua-cjson lua-check lua-filesystem
          libpng-dev libturbojpeg0-dev zlib1g-dev libopenblas-dev libdnnl-dev libreadline-dev
          openmpi-bin libopenmpi-dev dataset-fashion-mnist python3-torch python3-numpy)

if [ "${NR_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

BUILD="${NR_BUILD_DIR:-build}"
# shellcheck disable=SC2086
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${NR_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
echo "setup: built $BUILD/nrlua"
