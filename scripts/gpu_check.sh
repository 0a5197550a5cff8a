#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds the `cuda` feature, runs the test suite with it
# (the tests themselves run on the CPU), times `eval` decoding of GPT-2 124M on the GPU beside
# the CPU, and runs the real-size benches (CPU). Models from scripts/make_real_size_models.sh
# (default /tmp/realsize). Record what it prints in BENCHMARKS.md with the GPU's name.
#
#   scripts/gpu_check.sh [MODELS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
models=${1:-/tmp/realsize}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
cargo test --release --features cuda
[[ -d $models/gpt2-124m ]] || scripts/make_real_size_models.sh "$models" 124m 355m
bin=target/release/minillm
cargo build --release --features cuda
# Decoding on the device: the same prompts on CPU and GPU, timed by the eval log.
for device in cpu gpu; do
  flag=(); [[ $device == gpu ]] && flag=(--gpu 0)
  /usr/bin/time -v "$bin" eval --model "$models/gpt2-124m" --sets dolly --seeds 10 --max-examples 64 \
    --max-new-tokens 64 --batch-size 16 --out "$(mktemp -d)/eval-$device" "${flag[@]}" 2>&1 |
    grep -E "tokens/s|Elapsed|Maximum resident" || true
done
MINILLM_REAL_SIZES=$models cargo bench --features cuda --bench real_sizes
