#!/usr/bin/env bash
# Compiles the `cuda` feature on a machine without a GPU, so that it cannot rot unnoticed
# (run by .ci/run after the tests). candle's CUDA kernels are compiled to PTX by nvcc at build
# time and the binary links libcuda/cuBLAS; all of it comes from Debian's CUDA 11.8 toolkit
# (`nvidia-cuda-toolkit`, bookworm non-free), installed here when nvcc is missing (~2 min;
# needs root and the Debian mirror, else skipped with a warning). Builds into target/cuda so
# the CPU build is untouched.
#
#   scripts/cuda_build_check.sh            # CUDA_COMPUTE_CAP picks the PTX target (default 80)
#
# On a GPU machine, scripts/gpu_check.sh runs the tests and benches against the device.
set -euo pipefail
cd "$(dirname "$0")/.."
# A machine that cannot get the toolkit (no root, no apt, no mirror) skips with a warning;
# a toolkit that is there and a build that fails is an error.
skip() {
  echo "WARNING: cuda feature not compiled: $1" >&2
  exit 0
}
if ! command -v nvcc >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || skip "nvcc is missing and cannot be installed here (needs root and apt-get)"
  sources=$(mktemp)
  cat >"$sources" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt_opts=(-o "Dir::Etc::sourcelist=$sources" -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0)
  timeout 300 apt-get update -qq "${apt_opts[@]}" || skip "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${apt_opts[@]}" \
    nvidia-cuda-toolkit >/dev/null || skip "installing Debian's nvidia-cuda-toolkit failed"
  rm -f "$sources"
fi
nvcc --version | tail -1
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
echo "cuda feature builds: target/cuda/release/minillm"
