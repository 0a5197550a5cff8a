#!/usr/bin/env bash
# Compiles the `cuda` feature on a machine without a GPU, so that it cannot rot unnoticed
# (run by .ci/run after the tests). candle's CUDA kernels are compiled to PTX by nvcc at build
# time and the binary links libcuda/cuBLAS; all of it comes from Debian's CUDA 11.8 toolkit
# (`nvidia-cuda-toolkit`, bookworm non-free), installed here when nvcc is missing (~2 min;
# needs root and the Debian mirror). Builds into target/cuda so the CPU build is untouched.
#
#   scripts/cuda_build_check.sh            # CUDA_COMPUTE_CAP picks the PTX target (default 80)
#
# On a GPU machine, scripts/gpu_check.sh runs the tests and benches against the device.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "nvcc is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 1
  fi
  sources=$(mktemp)
  cat >"$sources" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt_opts=(-o "Dir::Etc::sourcelist=$sources" -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0)
  apt-get update -qq "${apt_opts[@]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_opts[@]}" nvidia-cuda-toolkit >/dev/null
  rm -f "$sources"
fi
nvcc --version | tail -1
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
echo "cuda feature builds: target/cuda/release/minillm"
