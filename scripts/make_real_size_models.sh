#!/usr/bin/env bash
# Random GPT-2-shaped model directories at the paper's sizes, with the real GPT-2 tokenizer
# (50,257 tokens), for the real-size benches and memory measurements (BENCHMARKS.md):
#
#   scripts/make_real_size_models.sh OUT_DIR [124m 355m 774m 1.5b] [--dtype bf16]
#
# Each OUT_DIR/gpt2-SIZE is what `transformers` calls GPT2LMHeadModel with GPT-2's published
# shape (layers × width, heads, 1,024 positions), initialised with transformers' scheme
# (normal(0, 0.02), zero biases, unit norms) by `minillm init`, which writes the Hugging Face
# layout transformers loads (scripts/check_saved.sh). Needs ../shared/data beside the checkout.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [SIZES...] [--dtype f32|bf16]}
shift
sizes=()
dtype=f32
while (($#)); do
  case $1 in
    --dtype) dtype=$2; shift 2 ;;
    *) sizes+=("$1"); shift ;;
  esac
done
((${#sizes[@]})) || sizes=(124m 355m 774m 1.5b)
here=$(cd "$(dirname "$0")/.." && pwd)
tokenizer=$here/../shared/data/gpt2_tokenizer
bin=$here/target/release/minillm
[[ -x $bin ]] || (cd "$here" && cargo build --release -j2)
mkdir -p "$out"
for size in "${sizes[@]}"; do
  case $size in
    124m) layers=12 width=768 heads=12 ;;
    355m) layers=24 width=1024 heads=16 ;;
    774m) layers=36 width=1280 heads=20 ;;
    1.5b) layers=48 width=1600 heads=25 ;;
    *) echo "unknown size $size (124m, 355m, 774m, 1.5b)" >&2; exit 2 ;;
  esac
  dir=$out/gpt2-$size
  if [[ -f $dir/model.safetensors ]]; then
    echo "$dir exists; skipped"
    continue
  fi
  config=$(mktemp)
  cat > "$config" <<JSON
{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 1024,
 "n_embd": $width, "n_layer": $layers, "n_head": $heads, "activation_function": "gelu_new",
 "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256,
 "tie_word_embeddings": true}
JSON
  "$bin" init --config "$config" --tokenizer "$tokenizer" --out "$dir" --dtype "$dtype" --seed 0
  rm -f "$config"
done
