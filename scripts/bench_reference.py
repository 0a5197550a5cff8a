#!/usr/bin/env python3
"""PyTorch timings of the work in benches/training.rs, for BENCHMARKS.md.

    python scripts/bench_reference.py [--threads 2]            # benches/training.rs
    python scripts/bench_reference.py --methods [--threads 2]  # benches/methods.rs

SFT step: GPT-2 (4 layers, width 256, 4 heads, vocab 8192), batch 8 x 128, forward + backward +
AdamW. Matmul: the step's shapes (tokens x width x out), for the machine's matmul rate.
Mixed decoding: student GPT-2 (2 layers, width 128) and teacher GPT-2 (4 layers, width 256)
sampling 32 rows x 128 new tokens from 32-token prompts in lockstep (both with KV caches,
mixing probabilities, teacher final hidden states kept). Distill iteration: the same models;
256 teacher-mixed rollouts of 32 new tokens (8 batches of 32), then 4 inner epochs of
minibatches of 8 (128 updates) with the clipped PG term (released returns/whitening), the
single-step reverse KL from the kept teacher states, and the PT term (0.5 CE + 0.5 teacher
soft CE on 8 x 128 chunks). Written to be as fast as plain PyTorch eager allows (no_grad where
possible, sdpa attention, no pure-student generation, the teacher run once per rollout).

Methods (--methods): one training step of GKD, DistiLLM and on-policy distillation (OPD) with
the student GPT-2 (2 x 128) and teacher GPT-2 (4 x 256), 8 prompts of 64 tokens, 64-token
responses (the data's, or sampled from the current student by `generate`). GKD is TRL's
GKDTrainer path itself: `GKDTrainer.generate_on_policy_outputs` with the trainer's generation
config, then its `compute_loss` (student and no-grad teacher forwards over the whole sequence,
`GKDTrainer.generalized_jsd_loss` at beta 0.5, temperature 0.9). DistiLLM: the same forwards
with the skew forward KL(p || 0.1 p + 0.9 q) over response tokens. OPD: `generate` with the
sampling logits kept (log q_old), one no-grad teacher forward scoring the sampled tokens, the
student's forward and the per-token importance-sampled policy gradient with advantage
log p - log q_old.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

V = 8192
REAL_V = 50257


def gpt2(layers, width, seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=512, n_embd=width, n_layer=layers, n_head=4,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def sft_step(model, opt, ids, autocast=False):
    """One SFT step on `ids` (next-token cross-entropy, backward, optimizer step), as a closure;
    with `autocast`, the forward pass under `torch.autocast` to bf16 (PyTorch's mixed precision on
    the CPU: bf16 products, f32 weights and optimizer), beside minillm's
    `train.matmul_precision = "bf16"`."""
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sft_step_bench():
    model = gpt2(4, 256, 1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-6)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (8, 128), generator=g)
    return timed(sft_step(model, opt, ids), 3, 10)


def matmul_bench(shapes=((1024, 256, 8192), (1024, 256, 1024), (1024, 1024, 256), (1024, 256, 768)),
                 dtype=torch.float32):
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / timed(lambda: a @ b, 3, 20) / 1e9
    return rates


def xl_layer_bench(dtype, rows=1024, hidden=1600):
    """GFLOP/s of one GPT-2 XL layer's four products over `rows` rows (benches/real_sizes.rs
    "gpt2-xl layer products"), weights and activations in `dtype`."""
    shapes = ((hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden))
    ws = [torch.randn(k, n).to(dtype) for k, n in shapes]
    xs = {k: torch.randn(rows, k).to(dtype) for k, _ in shapes}

    def layer():
        for (k, _), w in zip(shapes, ws):
            xs[k] @ w
    return sum(2 * rows * k * n for k, n in shapes) / timed(layer, 2, 10) / 1e9


def whiten(x):
    var, mean = torch.var_mean(x)
    return (x - mean) * torch.rsqrt(var + 1e-8)


# transformers 5.2x renamed the models' cache argument and output field from `past_key_values`
# to `cache` (the old name still works, with a deprecation warning); use whichever this
# version has.
CACHE = ("cache" if "cache" in getattr(transformers.modeling_outputs.CausalLMOutputWithCrossAttentions,
                                      "__dataclass_fields__", {}) else "past_key_values")


@torch.no_grad()
def mixed_rollouts(student, teacher, prompts, new_tokens, alpha, g, mask=None):
    """Teacher-mixed sampling: both models decode in lockstep with their caches; returns the
    tokens, log q and log p of each, and the teacher's final hidden state at each position.
    With `mask` (left-padded prompts), the attention mask and the position ids transformers'
    generation derives from it go with every forward."""
    extra = {}
    if mask is not None:
        extra = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}

    def step(ids, s_past=None, t_past=None):
        s_out = student(input_ids=ids, use_cache=True, **{CACHE: s_past}, **extra)
        t_out = teacher(input_ids=ids, use_cache=True, output_hidden_states=True, **{CACHE: t_past}, **extra)
        # A bf16 model's logits mix in f32.
        return (getattr(s_out, CACHE), getattr(t_out, CACHE), s_out.logits[:, -1].float(),
                t_out.logits[:, -1].float(), t_out.hidden_states[-1][:, -1])

    s_past, t_past, s_logits, t_logits, t_h = step(prompts)
    toks, lqs, lps, hs = [], [], [], []
    for _ in range(new_tokens):
        lq, lp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        mix = (1 - alpha) * lq.exp() + alpha * lp.exp()
        y = torch.multinomial(mix, 1, generator=g)
        toks.append(y[:, 0]); lqs.append(lq.gather(1, y)[:, 0]); lps.append(lp.gather(1, y)[:, 0]); hs.append(t_h)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(y)], 1)
            extra = {"attention_mask": mask, "position_ids": extra["position_ids"][:, -1:] + 1}
        s_past, t_past, s_logits, t_logits, t_h = step(y, s_past, t_past)
    return torch.stack(toks, 1), torch.stack(lqs, 1), torch.stack(lps, 1), torch.stack(hs, 1)


def mixed_decoding_bench():
    student, teacher = gpt2(2, 128, 3).eval(), gpt2(4, 256, 6).eval()
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, V, (32, 32), generator=g)
    return timed(lambda: mixed_rollouts(student, teacher, prompts, 128, 0.2, g), 1, 5)


ROLLOUTS, ROLLOUT_BATCH, MINIBATCH = 256, 32, 8


def importance_weights(logq_old, logp, alpha):
    """q / ((1 - alpha) q + alpha p) of each sampled token: teacher-mixed sampling's correction."""
    mix_lp = torch.log((1 - alpha) * logq_old.exp() + alpha * logp.exp())
    return torch.exp(logq_old - mix_lp)


def clipped_pg(lq, logq_old, w, rewards, gamma, eps_clip):
    """The clipped policy-gradient surrogate on returns (discount `gamma`) normalised by the
    number of future tokens and whitened, importance-weighted by `w`."""
    n = rewards.shape[1]
    ret, last = [], 0
    for t in reversed(range(n)):
        last = rewards[:, t] + gamma * last
        ret.append(last)
    adv = whiten(torch.stack(ret[::-1], 1) / torch.arange(n, 0, -1))
    ratio = torch.exp(lq - logq_old) * w
    return torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_clip, 1 + eps_clip)).mean()


def pt_term(student, teacher, chunk):
    """The PT term on corpus chunks: 0.5 CE + 0.5 soft CE against the teacher (no gradients)."""
    pl = student(input_ids=chunk).logits[:, :-1]
    with torch.no_grad():
        tp = F.softmax(teacher(input_ids=chunk).logits[:, :-1].float(), -1)
    lps = F.log_softmax(pl, -1)
    ce = F.nll_loss(lps.reshape(-1, lps.shape[-1]), chunk[:, 1:].reshape(-1))
    return 0.5 * ce - 0.5 * (tp * lps).sum(-1).mean()


def distill_iteration_bench():
    student, teacher = gpt2(2, 128, 3).train(), gpt2(4, 256, 6).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-6)
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, V, (512, 32), generator=g)
    corpus = torch.randint(1, V, (512, 128), generator=g)
    alpha, gamma, eps_clip = 0.2, 0.95, 0.2

    def iteration():
        with torch.no_grad():
            batch = prompts[torch.randperm(512, generator=g)[:ROLLOUTS]]
            parts = [mixed_rollouts(student, teacher, batch[i:i + ROLLOUT_BATCH], 32, alpha, g)
                     for i in range(0, ROLLOUTS, ROLLOUT_BATCH)]
            resp, logq_old, logp, t_hidden = (torch.cat(x) for x in zip(*parts))
            w = importance_weights(logq_old, logp, alpha)
            rewards = torch.clip((logp - logq_old) / 0.5, -100, 100)
        full = torch.cat([batch, resp], 1)
        for epoch in range(4):
            perm = torch.randperm(ROLLOUTS, generator=g)
            for k in range(ROLLOUTS // MINIBATCH):
                idx = perm[k * MINIBATCH:(k + 1) * MINIBATCH]
                logits = student(input_ids=full[idx]).logits[:, 31:63]
                lq_all = F.log_softmax(logits, -1)
                lq = lq_all.gather(2, resp[idx, :, None])[..., 0]
                pg = clipped_pg(lq, logq_old[idx], w[idx], rewards[idx], gamma, eps_clip)
                with torch.no_grad():
                    tl = F.log_softmax(teacher.lm_head(t_hidden[idx]), -1)
                single = (lq_all.exp() * (lq_all - tl)).sum(-1).mean()
                chunk = corpus[torch.randint(0, 512, (MINIBATCH,), generator=g)]
                loss = pg + single + pt_term(student, teacher, chunk)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    return timed(iteration, 1, 3)


BATCH, PROMPT, RESPONSE = 8, 64, 64


def method_data():
    g = torch.Generator().manual_seed(11)
    prompts = torch.randint(1, V, (BATCH, PROMPT), generator=g)
    responses = torch.randint(1, V, (BATCH, RESPONSE), generator=g)
    responses[:, -1] = 0  # EOS
    return prompts, responses


def sampled_config(temperature):
    """The generation config TRL's GKDTrainer builds (sampling, top_k 0, top_p 1, KV cache)."""
    from transformers import GenerationConfig
    return GenerationConfig(max_new_tokens=RESPONSE, temperature=temperature, do_sample=True, top_k=0, top_p=1.0,
                            use_cache=True, pad_token_id=0, eos_token_id=0)


def sampled(model, prompts, temperature, keep_logits=False):
    with torch.no_grad():
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                              generation_config=sampled_config(temperature), return_dict_in_generate=True,
                              output_logits=keep_logits)


def supervised_step(student, teacher, opt, ids, mask, labels, loss_fn):
    """TRL GKDTrainer.compute_loss's forwards, `loss_fn` on the shifted logits, backward, AdamW."""
    s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    loss = loss_fn(s_logits, t_logits, labels[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def skew_forward_kl(s_logits, t_logits, labels, lam=0.1):
    mask = labels != -100
    lp, lq = F.log_softmax(t_logits[mask], -1), F.log_softmax(s_logits[mask], -1)
    lm = torch.logaddexp(lp + torch.log(torch.tensor(lam)), lq + torch.log(torch.tensor(1 - lam)))
    return (lp.exp() * (lp - lm)).sum(-1).mean()


def method_benches():
    from trl.experimental.gkd import GKDTrainer
    prompts, responses = method_data()
    data_ids = torch.cat([prompts, responses], 1)
    data_labels = data_ids.clone()
    data_labels[:, :PROMPT] = -100
    ones = torch.ones_like(data_ids)
    results = {}

    def setup():
        student, teacher = gpt2(2, 128, 3).train(), gpt2(4, 256, 6).eval()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-6)
        return student, teacher, opt

    def gjsd(s, t, labels):
        return GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.5, temperature=0.9)

    for name, loss_fn, temperature in [("gkd", gjsd, 0.9), ("distillm", skew_forward_kl, 1.0)]:
        student, teacher, opt = setup()
        results[f"{name} data step"] = timed(
            lambda: supervised_step(student, teacher, opt, data_ids, ones, data_labels, loss_fn), 3, 20)

        def on_policy():
            if name == "gkd":
                inputs = {"prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)}
                ids, mask, labels = GKDTrainer.generate_on_policy_outputs(student, inputs, sampled_config(temperature))
            else:
                ids = sampled(student, prompts, temperature).sequences
                mask, labels = torch.ones_like(ids), ids.clone()
                labels[:, :PROMPT] = -100
            supervised_step(student, teacher, opt, ids, mask, labels, loss_fn)

        results[f"{name} student-sampled step"] = timed(on_policy, 3, 20)

    student, teacher, opt = setup()

    def opd_step():
        out = sampled(student, prompts, 1.0, keep_logits=True)
        ids, resp = out.sequences, out.sequences[:, PROMPT:]
        with torch.no_grad():
            logq_old = torch.stack([F.log_softmax(l, -1) for l in out.logits], 1).gather(2, resp[..., None])[..., 0]
            logp = F.log_softmax(teacher(input_ids=ids).logits[:, PROMPT - 1:-1], -1).gather(2, resp[..., None])[..., 0]
            adv = logp - logq_old
        logq = F.log_softmax(student(input_ids=ids).logits[:, PROMPT - 1:-1], -1).gather(2, resp[..., None])[..., 0]
        loss = -(torch.exp(logq - logq_old) * adv).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    results["opd step"] = timed(opd_step, 3, 20)
    return results



def real_benches(root, sft=True, bf16=True, decode=True, sft_shapes=((4, 298), (8, 512))):
    """The work of benches/real_sizes.rs on the models of scripts/make_real_size_models.sh
    (without the SFT steps when `sft` is false, the SFT steps at `sft_shapes` (rows, length)
    otherwise, without the bf16 rows when `bf16` is false, without decoding and rollouts when
    `decode` is false)."""
    results = {}
    load = lambda size: transformers.GPT2LMHeadModel.from_pretrained(os.path.join(root, f"gpt2-{size}"))
    g = torch.Generator().manual_seed(2)
    model = load("124m").train()
    if sft:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-6)
        for rows, length in sft_shapes:
            ids = torch.randint(0, REAL_V - 1, (rows, length), generator=g)
            results[f"sft_step gpt2-124m b{rows}x{length}"] = (timed(sft_step(model, opt, ids), 2, 6), None)
            if bf16:
                step = sft_step(model, opt, ids, autocast=True)
                results[f"sft_step gpt2-124m b{rows}x{length} autocast-bf16"] = (timed(step, 2, 6), None)
        del opt
    if not decode:
        return results
    model.eval()
    model_bf16 = load("124m").eval().to(torch.bfloat16) if bf16 else None
    runs = [(16, model, ""), (64, model, "")] + ([(16, model_bf16, "-bf16"), (64, model_bf16, "-bf16")] if bf16 else [])
    for rows, m, dtype in runs:
        prompts = torch.randint(0, REAL_V - 1, (rows, 64), generator=g)

        def decode():
            with torch.no_grad():
                out = m.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64, min_new_tokens=64,
                                     pad_token_id=REAL_V - 1)
            assert out.shape[1] == 128

        results[f"decode gpt2-124m{dtype} b{rows} 64+64"] = (timed(decode, 1, 5), rows * 64)
    # Rows that stop (benches/real_sizes.rs "stopping"): 1,000 stop ids, up to 128 new tokens;
    # tokens per second counts each row's tokens up to its first stop id.
    stops = list(range(0, REAL_V - 257, 50))
    prompts = torch.randint(0, REAL_V - 1, (64, 64), generator=g)
    generated = []

    def decode_stopping():
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=128,
                                 eos_token_id=stops, pad_token_id=REAL_V - 1)
        stop_set = set(stops)
        for row in out[:, 64:].tolist():
            ends = [j for j, t in enumerate(row) if t in stop_set]
            generated.append(ends[0] + 1 if ends else len(row))

    seconds = timed(decode_stopping, 1, 5)
    # Tokens of the timed runs only (the warm-up run's rows come first).
    per_run = sum(generated[64:]) / (len(generated) // 64 - 1)
    results["decode gpt2-124m b64 64+128 stopping"] = (seconds, per_run)
    del model_bf16
    teacher = load("355m").eval()
    prompts = torch.randint(0, REAL_V - 1, (16, 64), generator=g)
    results["teacher-mixed gpt2-124m + gpt2-355m b16 64+32"] = (
        timed(lambda: mixed_rollouts(model, teacher, prompts, 32, 0.2, g), 1, 5), 16 * 32)
    if not bf16:
        return results
    teacher = teacher.to(torch.bfloat16)
    results["teacher-mixed gpt2-124m + gpt2-355m-bf16 b16 64+32"] = (
        timed(lambda: mixed_rollouts(model, teacher, prompts, 32, 0.2, g), 1, 5), 16 * 32)
    return results


def format_prompt(instruction, inp):
    """MiniLLM's prompt template (src/tokenizer.rs)."""
    head = "Below is an instruction that describes a task"
    if not inp:
        return (f"{head}. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Response:\n")
    return (f"{head}, paired with an input that provides further context. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n")


def left_pad(prompts, extra=0):
    """Token lists left-padded to the longest (GPT-2's EOS as the pad) and their attention mask,
    with `extra` more real positions to come after each row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[REAL_V - 1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + extra) for p in prompts])
    return ids, mask


def real_distill_iteration(root, teacher_size, teacher_dtype, data, autocast=False):
    """One `distill` iteration at the paper's shapes, timed by phase, as BENCHMARKS.md's
    command runs it: the first 16 Dolly training prompts (what `data.train_limit=16` keeps),
    16 teacher-mixed rollouts of 32 new tokens in 2 batches of 8, then one inner epoch of 2
    updates of 8 rollouts, each with the clipped PG term, the single-step reverse KL from the
    kept teacher states and the PT term over 8 x 512-token chunks (0.5 CE + 0.5 teacher soft CE,
    the teacher forward without gradients), backward and AdamW. With `autocast`, collection and
    the forward passes run under `torch.autocast` to bf16 (what minillm's
    `train.matmul_precision = "bf16"` is compared with)."""
    import json
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(os.path.join(root, "gpt2-124m", "tokenizer.json"))
    with open(os.path.join(data, "minillm_dolly_train", "train.jsonl")) as f:
        rows = [json.loads(next(f)) for _ in range(16)]
    prompts = [tok.encode(format_prompt(r["instruction"], r["input"])).ids for r in rows]
    assert all(prompts), "empty prompt"
    student = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(root, "gpt2-124m")).train()
    teacher = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(root, f"gpt2-{teacher_size}"),
                                                           torch_dtype=teacher_dtype).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    g = torch.Generator().manual_seed(4)
    alpha, gamma, eps_clip, new = 0.2, 1.0, 0.2, 32
    phases = {}

    def timed_phase(name, fn):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and name not in ("backward", "update")):
            out = fn()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return out

    t_all = time.perf_counter()
    def collect():
        out = []
        for chunk in (prompts[:8], prompts[8:]):
            ids, mask = left_pad(chunk)
            out.append((chunk, mixed_rollouts(student, teacher, ids, new, alpha, g, mask=mask)))
        return out

    parts = timed_phase("collect", collect)
    for chunk, (resp, logq_old, logp, t_hidden) in parts:
        def forward():
            ids, mask = left_pad(chunk, extra=new)
            width = ids.shape[1]
            full = torch.cat([ids, resp], 1)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = student(input_ids=full, attention_mask=mask, position_ids=pos).logits[:, width - 1:-1]
            lq_all = F.log_softmax(logits.float(), -1)
            lq = lq_all.gather(2, resp[:, :, None])[..., 0]
            with torch.no_grad():
                w = importance_weights(logq_old, logp, alpha)
                tl = F.log_softmax(teacher.lm_head(t_hidden).float(), -1)
            pg = clipped_pg(lq, logq_old, w, logp - logq_old, gamma, eps_clip)
            single = (lq_all.exp() * (lq_all - tl)).sum(-1).mean()
            return pg + single

        loss = timed_phase("forward", forward)
        chunk_ids = torch.randint(0, REAL_V - 1, (8, 512), generator=g)
        loss = loss + timed_phase("pt_forward", lambda: pt_term(student, teacher, chunk_ids))
        timed_phase("backward", loss.backward)

        def update():
            opt.step()
            opt.zero_grad(set_to_none=True)

        timed_phase("update", update)
    phases["total"] = time.perf_counter() - t_all
    return phases


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", action="store_true", help="the steps of benches/methods.rs")
    ap.add_argument("--real", metavar="DIR", help="the benches of benches/real_sizes.rs on DIR/gpt2-{124m,355m}")
    ap.add_argument("--no-sft", action="store_true", help="--real without the SFT steps")
    ap.add_argument("--sft-only", action="store_true", help="--real with the SFT steps alone")
    ap.add_argument("--sft-shapes", default="4x298,8x512",
                    help="--real's SFT batches as ROWSxLENGTH, comma-separated (8x512 takes ~50 s a step on 2 cores)")
    ap.add_argument("--no-bf16", action="store_true",
                    help="--real without the bf16 rows (on CPUs without bf16 instructions PyTorch's bf16 "
                         "decoding takes minutes per run)")
    ap.add_argument("--matmul-real", action="store_true",
                    help="torch.mm's rate on 4096^3, GPT-2 124M's training products and one GPT-2 XL "
                         "layer's products (f32 and bf16)")
    ap.add_argument("--real-distill", metavar="DIR", help="one distill iteration of DIR/gpt2-124m with a teacher")
    ap.add_argument("--teacher", default="1.5b", help="--real-distill's teacher size (DIR/gpt2-SIZE)")
    ap.add_argument("--teacher-dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--autocast", action="store_true",
                    help="--real-distill with collection and forward passes under torch.autocast to bf16")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads")
    if a.real_distill:
        dtype = torch.bfloat16 if a.teacher_dtype == "bf16" else torch.float32
        phases = real_distill_iteration(a.real_distill, a.teacher, dtype, a.data, a.autocast)
        print("distill iteration, 124m + " + a.teacher + f" ({a.teacher_dtype})"
              + (", autocast bf16" if a.autocast else "") + ": "
              + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
        raise SystemExit
    if a.matmul_real:
        real_shapes = ((4096, 4096, 4096), (1192, 768, 3072), (1192, 3072, 768), (2048, 768, REAL_V))
        for shape, rate in matmul_bench(real_shapes).items():
            print(f"matmul {shape}: {rate:.0f} GFLOP/s")
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            print(f"gpt2-xl layer products 1024 rows {name}: {xl_layer_bench(dtype):.0f} GFLOP/s")
        raise SystemExit
    if a.real:
        for name, (t, tokens) in real_benches(a.real, sft=not a.no_sft, bf16=not a.no_bf16, decode=not a.sft_only,
                                              sft_shapes=[tuple(map(int, s.split("x"))) for s in a.sft_shapes.split(",")]).items():
            rate = f" = {tokens / t:.0f} tokens/s" if tokens else ""
            print(f"{name}: {t * 1e3:.0f} ms{rate} (median)")
        raise SystemExit
    if a.methods:
        import trl
        print(f"trl {trl.__version__}")
        for name, t in method_benches().items():
            print(f"{name}: {t * 1e3:.1f} ms (median of 20)")
        raise SystemExit
    for shape, rate in matmul_bench().items():
        print(f"matmul {shape}: {rate:.0f} GFLOP/s")
    print(f"sft_step: {sft_step_bench() * 1e3:.1f} ms (median of 10)")
    t = mixed_decoding_bench()
    print(f"mixed_decoding b32 x 128: {t * 1e3:.0f} ms = {32 * 128 / t:.0f} tokens/s (median of 5)")
    print(f"distill_iteration ({ROLLOUTS} rollouts, {ROLLOUTS // MINIBATCH * 4} updates): "
          f"{distill_iteration_bench():.2f} s (median of 3)")
