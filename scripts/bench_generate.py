#!/usr/bin/env python3
"""Generation throughput of the evaluation protocol in transformers, for BENCHMARKS.md.

    python scripts/bench_generate.py DIR      # builds DIR (random GPT-2 6x384, GPT-2 BPE) if missing

Samples 32 DollyEval prompts (first 32) in batches of 16, left padding, temperature 1,
top-k off, top-p 1, no_repeat_ngram_size 6, 64 new tokens, 2 threads; prints generated
tokens per second. The minillm side: `minillm eval --model DIR --sets dolly --seeds 10
--max-examples 32 --max-new-tokens 64 --batch-size 16` with RUST_LOG=info.
"""
import json
import os
import sys
import time

import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "..", "shared", "data")


def build(d):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    g = os.path.join(DATA, "gpt2_tokenizer")
    bpe = Tokenizer(models.BPE.from_file(os.path.join(g, "encoder.json"), os.path.join(g, "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=6, n_embd=384, n_head=6)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)


def main(d):
    if not os.path.isdir(d):
        build(d)
    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    prompts = [json.loads(l)["prompt"] for l in open(os.path.join(DATA, "minillm_eval", "dolly", "valid.jsonl"))][:32]
    torch.manual_seed(10)
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, 32, 16):
        enc = tok(prompts[i:i + 16], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=6,
                                 max_new_tokens=64, pad_token_id=tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        tokens += int((new != tok.eos_token_id).sum()) + int((new == tok.eos_token_id).any(1).sum())
    dt = time.perf_counter() - t0
    print(f"transformers {transformers.__version__}: {tokens} tokens in {dt:.1f} s = {tokens / dt:.0f} tokens/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpt2-6x384")
