#!/usr/bin/env bash
# quickstart.sh — installs, builds, and trains the Fashion-MNIST quickstart (recipes/fashion_mnist.lua).
# Extra arguments go to the recipe, e.g. ./scripts/quickstart.sh --epochs 2
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec ./build/nrlua recipes/fashion_mnist.lua "$@"
