#!/usr/bin/env python3
"""Reference fixtures for minillm's model tests, produced by `transformers` itself.

    python scripts/make_fixtures.py build            # writes tests/fixtures/{models,logits}
    python scripts/make_fixtures.py check-saved DIR  # transformers loads a minillm-saved model
    python scripts/make_fixtures.py processors       # writes tests/fixtures/logits/processors.safetensors
    python scripts/make_fixtures.py grads            # writes tests/fixtures/logits/grads.safetensors
    python scripts/make_fixtures.py rope-linear      # writes models/ and logits/llama_rope_linear
    python scripts/make_fixtures.py bf16             # writes tests/fixtures/logits/bf16.safetensors

`build` creates randomly initialised tiny models of every supported family, saves them with
`save_pretrained(safe_serialization=True)`, and stores input batches (right padding, left
padding, no padding), transformers' logits for them, and the tokens of greedy
`generate(do_sample=False)` from left-padded prompts. The Rust tests read these files; they
need no Python.

`processors` runs transformers' own logits processors (temperature, top-k, top-p,
no-repeat-n-gram, and all four chained in `generate`'s order) on random logits with random
token histories, and `generate(do_sample=False, no_repeat_ngram_size=2)` of the `opt` fixture
model on unpadded prompts, token for token.

Requires PyPI `torch`, `transformers`, `tokenizers`, `safetensors`.
"""
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
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
    original fixture model's on every fixture batch. A model saved in bf16 or f16 is compared
    with the fixture model rounded to that dtype by torch (both then computed in float32), so
    the check is exact for the rounding as well."""
    from safetensors import safe_open
    with safe_open(os.path.join(saved_dir, "model.safetensors"), "pt") as f:
        saved_dtype = f.get_tensor(next(iter(f.keys()))).dtype
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(FIX, "models", name), attn_implementation="eager").eval()
    if saved_dtype != torch.float32:
        # Round the parameters only: `.to(dtype)` would round the rope frequencies too.
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(saved_dtype).float())
    got = transformers.AutoModelForCausalLM.from_pretrained(
        saved_dir, attn_implementation="eager", dtype=torch.float32).eval()
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
    print(f"{name}: transformers loads {saved_dir} ({saved_dtype}); max |logit difference| = {worst:.3g}")
    return worst


def rope_linear():
    """The llama fixture's weights with linear rope scaling, and transformers' logits."""
    src = os.path.join(FIX, "models", "llama")
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    model = transformers.AutoModelForCausalLM.from_pretrained(src, config=cfg, attn_implementation="eager").eval()
    d = os.path.join(FIX, "models", "llama_rope_linear")
    model.save_pretrained(d, safe_serialization=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), d)
    data = load_file(os.path.join(FIX, "logits", "llama.safetensors"))
    tensors = {}
    with torch.no_grad():
        for b in ["right", "left", "full"]:
            ids, mask = data[f"{b}.input_ids"], data[f"{b}.attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            tensors[f"{b}.input_ids"], tensors[f"{b}.attention_mask"] = ids, mask
            tensors[f"{b}.logits"] = logits.float().contiguous()
    save_file(tensors, os.path.join(FIX, "logits", "llama_rope_linear.safetensors"))
    print("wrote", d)


def bf16():
    """transformers' bf16 and f16 logits of every fixture model on the unpadded batch."""
    tensors = {}
    for name in ["gpt2", "opt", "opt_postln", "llama", "qwen2", "mistral"]:
        for key, dtype in [("logits", torch.bfloat16), ("f16_logits", torch.float16)]:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.join(FIX, "models", name), attn_implementation="eager", dtype=dtype).eval()
            ids = load_file(os.path.join(FIX, "logits", f"{name}.safetensors"))["full.input_ids"]
            with torch.no_grad():
                tensors[f"{name}.{key}"] = model(input_ids=ids).logits.float().contiguous()
    save_file(tensors, os.path.join(FIX, "logits", "bf16.safetensors"))
    print("wrote bf16 logits")


def grads():
    """Whole-model gradients of the mean next-token cross-entropy, every family, float64."""
    tensors = {}
    for name in ["gpt2", "opt", "opt_postln", "llama", "qwen2", "mistral"]:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(FIX, "models", name), attn_implementation="eager").double()
        ids = load_file(os.path.join(FIX, "logits", f"{name}.safetensors"))["full.input_ids"]
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        tensors[f"{name}.loss"] = loss.detach().float().reshape(1)
        for pname, param in model.named_parameters():
            tensors[f"{name}.grad.{pname}"] = param.grad.float().contiguous()
        print(f"{name}: loss {loss.item():.6f}")
    save_file(tensors, os.path.join(FIX, "logits", "grads.safetensors"))


def processors():
    """transformers' logits processors on random logits (no ties) and histories drawn from 6
    tokens (so n-grams repeat), and greedy generation with n-gram blocking."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper)

    g = torch.Generator().manual_seed(7)
    rows, vocab = 8, 384
    logits = torch.randn(rows, vocab, generator=g) * 3
    history = torch.randint(0, 6, (rows, 24), generator=g)
    cases = {
        "temperature": LogitsProcessorList([TemperatureLogitsWarper(0.7)]),
        "top_k": LogitsProcessorList([TopKLogitsWarper(5)]),
        "top_p": LogitsProcessorList([TopPLogitsWarper(0.9)]),
        "no_repeat": LogitsProcessorList([NoRepeatNGramLogitsProcessor(3)]),
        # generate's order: processors, then temperature, top-k, top-p.
        "all": LogitsProcessorList([NoRepeatNGramLogitsProcessor(2), TemperatureLogitsWarper(0.7),
                                    TopKLogitsWarper(20), TopPLogitsWarper(0.8)]),
    }
    tensors = {"logits": logits, "history": history.int()}
    for name, procs in cases.items():
        tensors[f"{name}.out"] = procs(history, logits.clone())
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", "opt")).eval()
    model.generation_config.eos_token_id = None  # 30 tokens, no stopping (Rust: no EOS ids)
    prompts = [torch.randint(1, vocab, (n,), generator=g) for n in (4, 7, 3)]
    outs = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                 max_new_tokens=30, no_repeat_ngram_size=2, pad_token_id=0)
        outs.append(out[0, len(p):])
    tensors["generate.prompts"] = torch.cat(prompts).int()
    tensors["generate.prompt_lens"] = torch.tensor([len(p) for p in prompts]).int()
    tensors["generate.output"] = torch.stack(outs).int()
    path = os.path.join(FIX, "logits", "processors.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    print("wrote", path)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "build":
        build()
    elif len(sys.argv) == 2 and sys.argv[1] == "processors":
        processors()
    elif len(sys.argv) == 2 and sys.argv[1] == "grads":
        grads()
    elif len(sys.argv) == 2 and sys.argv[1] == "rope-linear":
        rope_linear()
    elif len(sys.argv) == 2 and sys.argv[1] == "bf16":
        bf16()
    elif len(sys.argv) == 4 and sys.argv[1] == "check-saved":
        sys.exit(0 if check_saved(sys.argv[2], sys.argv[3]) < 1e-5 else 1)
    else:
        print(__doc__)
        sys.exit(2)
