#!/usr/bin/env python3
"""Reference fixtures for minillm's model tests, produced by `transformers` itself.

    python scripts/make_fixtures.py build            # writes tests/fixtures/{models,logits}
    python scripts/make_fixtures.py check-saved DIR  # transformers loads a minillm-saved model

`build` creates randomly initialised tiny models of every supported family, saves them with
`save_pretrained(safe_serialization=True)`, and stores input batches (right padding, left
padding, no padding), transformers' logits for them, and the tokens of greedy
`generate(do_sample=False)` from left-padded prompts. The Rust tests read these files; they
need no Python.

Requires PyPI `torch`, `transformers`, `tokenizers`, `safetensors`.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
DOLLY = os.path.join(ROOT, "..", "shared", "data", "minillm_dolly_train", "train.jsonl")
EOS = "<|endoftext|>"


def train_tokenizer():
    """A byte-level BPE with 384 tokens, trained on Dolly responses (deterministic)."""
    texts = []
    with open(DOLLY) as f:
        for i, line in enumerate(f):
            if i >= 3000:
                break
            r = json.loads(line)
            texts.append(r["instruction"] + "\n" + r["output"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def configs(vocab, eos):
    common = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return {
        "gpt2": transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
            initializer_range=0.15, **common),
        "opt": transformers.OPTConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
            num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=True,
            word_embed_proj_dim=64, init_std=0.15, **common),
        # opt-350m style: post-LN blocks and a narrower embedding with project_in/out.
        "opt_postln": transformers.OPTConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
            num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=False,
            word_embed_proj_dim=48, init_std=0.15, **common),
        # GQA, untied LM head, embedding padded beyond the tokenizer, Llama-3 rope scaling.
        "llama": transformers.LlamaConfig(
            vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.15,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
            **common),
        # q/k/v biases, tied embeddings.
        "qwen2": transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=1e6, tie_word_embeddings=True, initializer_range=0.15, **common),
        # sliding window shorter than the longest fixture sequence.
        "mistral": transformers.MistralConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
            sliding_window=8, tie_word_embeddings=False, initializer_range=0.15, **common),
    }


def perturb(model, gen):
    """Move every 1-D parameter (norm weights, biases) away from its 1/0 init, so that a
    missing bias or a swapped norm changes the logits."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def position_ids(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def batches(gen, vocab):
    out = {}
    lens = [12, 7, 3]
    T = max(lens)
    ids = torch.randint(0, vocab, (len(lens), T), generator=gen)
    right = torch.zeros(len(lens), T, dtype=torch.long)
    left = torch.zeros(len(lens), T, dtype=torch.long)
    rids, lids = ids.clone(), ids.clone()
    for b, n in enumerate(lens):
        right[b, :n] = 1
        left[b, T - n:] = 1
        rids[b, n:] = 0
        lids[b, : T - n] = 0
        lids[b, T - n:] = ids[b, :n]
    out["right"] = (rids, right)
    out["left"] = (lids, left)
    full = torch.randint(0, vocab, (2, 20), generator=gen)
    out["full"] = (full, torch.ones_like(full))
    return out


def build():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id(EOS)
    os.makedirs(os.path.join(FIX, "models"), exist_ok=True)
    os.makedirs(os.path.join(FIX, "logits"), exist_ok=True)
    for name, cfg in configs(vocab, eos).items():
        torch.manual_seed(len(name))
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        perturb(model, gen)
        model.eval()
        d = os.path.join(FIX, "models", name)
        model.save_pretrained(d, safe_serialization=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        tensors = {}
        with torch.no_grad():
            for bname, (ids, mask) in batches(gen, vocab).items():
                kw = {} if cfg.model_type == "opt" else {"position_ids": position_ids(mask)}
                logits = model(input_ids=ids, attention_mask=mask, **kw).logits
                tensors[f"{bname}.input_ids"] = ids
                tensors[f"{bname}.attention_mask"] = mask
                tensors[f"{bname}.logits"] = logits.float().contiguous()
            # Greedy decoding from left-padded prompts.
            lens = [5, 9, 2]
            T = max(lens)
            ids = torch.full((3, T), eos, dtype=torch.long)
            mask = torch.zeros(3, T, dtype=torch.long)
            for b, n in enumerate(lens):
                ids[b, T - n:] = torch.randint(0, vocab - 1, (n,), generator=gen)
                mask[b, T - n:] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                 do_sample=False, pad_token_id=eos, eos_token_id=eos)
            tensors["greedy.input_ids"] = ids
            tensors["greedy.attention_mask"] = mask
            tensors["greedy.output"] = out[:, T:].contiguous()
        save_file(tensors, os.path.join(FIX, "logits", f"{name}.safetensors"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")
    with open(os.path.join(FIX, "logits", "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n")


def check_saved(saved_dir, name):
    """Loads a minillm-saved model with transformers and compares its logits with the
    original fixture model's on every fixture batch."""
    from safetensors.torch import load_file
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(FIX, "models", name), attn_implementation="eager").eval()
    got = transformers.AutoModelForCausalLM.from_pretrained(
        saved_dir, attn_implementation="eager").eval()
    data = load_file(os.path.join(FIX, "logits", f"{name}.safetensors"))
    worst = 0.0
    with torch.no_grad():
        for b in ["right", "left", "full"]:
            ids, mask = data[f"{b}.input_ids"], data[f"{b}.attention_mask"]
            kw = {} if ref.config.model_type == "opt" else {"position_ids": position_ids(mask)}
            a = ref(input_ids=ids, attention_mask=mask, **kw).logits
            c = got(input_ids=ids, attention_mask=mask, **kw).logits
            m = mask.bool()
            worst = max(worst, (a[m] - c[m]).abs().max().item())
    print(f"{name}: transformers loads {saved_dir}; max |logit difference| = {worst:.3g}")
    return worst


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "build":
        build()
    elif len(sys.argv) == 4 and sys.argv[1] == "check-saved":
        sys.exit(0 if check_saved(sys.argv[2], sys.argv[3]) < 1e-5 else 1)
    else:
        print(__doc__)
        sys.exit(2)
