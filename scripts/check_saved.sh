#!/usr/bin/env bash
# transformers loads what minillm saves: every fixture model is converted by `minillm convert`
# in f32 and bf16 and loaded back with AutoModelForCausalLM; its logits must equal the fixture
# model's (rounded by torch to the same dtype) on every fixture batch.
#
#     scripts/check_saved.sh [PYTHON]     # PYTHON with torch, transformers, safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
cargo build --release -q
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for dtype in f32 bf16; do
  for n in gpt2 opt opt_postln llama qwen2 mistral; do
    ./target/release/minillm convert --model "tests/fixtures/models/$n" --dtype "$dtype" --out "$out/$dtype/$n" >/dev/null
    "$PY" scripts/make_fixtures.py check-saved "$out/$dtype/$n" "$n" 2>/dev/null | grep -v "^Loading"
  done
done
