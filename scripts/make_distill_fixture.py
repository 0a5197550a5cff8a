#!/usr/bin/env python3
"""PyTorch reference for one `distill` update on real tiny models, written from
../shared/reference/REFERENCE.md §2-5 independently of the Rust code.

    python scripts/make_distill_fixture.py     # writes tests/fixtures/losses/distill_step.safetensors

Student: the `gpt2` fixture model (384-token vocabulary, tied head); teacher: the `llama`
fixture model (448 rows, 64 beyond the shared vocabulary). Eight (prompt, response) pairs of
different lengths (one response ending in EOS) stand for a rollout buffer collected with
α = 0.2, and eight corpus chunks for the PT term. Everything is computed in float64 with each
sequence run on its own (no padding):
- log q_old, log p of the response tokens over the shared vocabulary (the first 384 ids; the
  teacher renormalised over them), w_t = q_old / ((1 − α) q_old + α p);
- rewards clip((log p − log q_old) / 0.5, ±100); discounted returns (γ = 0.95, including r_t)
  divided by the number of remaining tokens; whitened over the [8, longest response] padded
  buffer (zeros beyond each response, torch.var_mean);
- on the first update log q = log q_old, so ρ_t = w_t; pg = Σ max(−A ρ, −A clip(ρ, 0.8, 1.2)) / N;
- single = Σ_t KL(q_t ‖ p_t) / N over the shared vocabulary (unweighted, as released);
- pt = Σ (0.5 CE + 0.5 H(p, q)) / N_pt over next-token targets of the chunks;
- loss = pg + single + pt and its gradient with respect to every student parameter;
and the same under the `paper` preset (keys `paper.*`) and the `opd` preset with γ = 0.5
(keys `opd.*`: α = 0, unscaled per-token rewards, discounted advantages, the plain
importance-sampled loss, no single-step or PT term).
"""
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
ALPHA, GAMMA, SCALING, REWARD_CLIP, EPS, PT_KD = 0.2, 0.95, 0.5, 100.0, 0.2, 0.5


def load(name):
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", name))
    return m.double().eval()


def main():
    student, teacher = load("gpt2"), load("llama")
    shared = min(student.config.vocab_size, teacher.config.vocab_size)
    g = torch.Generator().manual_seed(4)
    prompt_lens = [3, 5, 2, 6, 4, 3, 5, 2]
    response_lens = [4, 1, 7, 3, 6, 2, 5, 4]
    prompts = [torch.randint(1, shared, (n,), generator=g) for n in prompt_lens]
    responses = [torch.randint(1, shared, (n,), generator=g) for n in response_lens]
    responses[2][-1] = 0  # ends with EOS
    chunks = [torch.randint(1, shared, (12,), generator=g) for _ in range(8)]
    out = {
        "prompts": torch.cat(prompts).int(), "prompt_lens": torch.tensor(prompt_lens).int(),
        "responses": torch.cat(responses).int(), "response_lens": torch.tensor(response_lens).int(),
        "chunks": torch.stack(chunks).int(),
    }
    for preset in ["released", "paper", "opd"]:
        values = update(student, teacher, shared, prompts, responses, chunks, preset)
        prefix = "" if preset == "released" else f"{preset}."
        out.update({prefix + k: v for k, v in values.items()})
    path = os.path.join(FIX, "losses", "distill_step.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print("wrote", path)


def update(student, teacher, shared, prompts, responses, chunks, preset):
    """The first update's values under the released defaults, the `paper` preset (future
    rewards t+1.., undiscounted, unscaled, unclipped rewards, mean over the remaining rewards,
    no whitening; single-step term weighted by w_t; PT term the plain LM loss), or the `opd`
    preset with γ = 0.5 (the Tinker recipe: samples from the student alone, so w = 1; per-token
    advantage Σ_k γ^k (log p − log q_old)_{t+k}; loss −Σ ρ_t A_t / N; no other term)."""
    paper, opd = preset == "paper", preset == "opd"
    alpha = 0.0 if opd else ALPHA

    def response_logits(model, p, y):
        ids = torch.cat([p, y])[None]
        logits = model(input_ids=ids).logits[0]
        return logits[len(p) - 1: len(p) + len(y) - 1, :shared]

    # Collection-time values (no gradient).
    lq_old, lp, w, rewards = [], [], [], []
    with torch.no_grad():
        for p, y in zip(prompts, responses):
            q = F.log_softmax(response_logits(student, p, y), -1).gather(1, y[:, None])[:, 0]
            t = F.log_softmax(response_logits(teacher, p, y), -1).gather(1, y[:, None])[:, 0]
            lq_old.append(q)
            lp.append(t)
            w.append(torch.exp(q - torch.log((1 - alpha) * q.exp() + alpha * t.exp())))
            rewards.append(t - q if paper or opd else torch.clamp((t - q) / SCALING, -REWARD_CLIP, REWARD_CLIP))
    width = max(len(y) for y in responses)
    adv = torch.zeros(len(responses), width, dtype=torch.float64)
    for b, r in enumerate(rewards):
        n, acc = len(r), 0.0
        for t in reversed(range(n)):
            if paper:
                adv[b, t] = acc / max(n - t - 1, 1)  # rewards after t, their mean
                acc = acc + r[t]
            elif opd:
                acc = r[t] + 0.5 * acc
                adv[b, t] = acc
            else:
                acc = r[t] + GAMMA * acc
                adv[b, t] = acc / (n - t)
    if not (paper or opd):
        var, mean = torch.var_mean(adv)
        adv = (adv - mean) * torch.rsqrt(var + 1e-8)

    student.zero_grad()
    n_tokens = sum(len(y) for y in responses)
    pg = torch.zeros((), dtype=torch.float64)
    single = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        t_logits = [response_logits(teacher, p, y) for p, y in zip(prompts, responses)]
    for b, (p, y) in enumerate(zip(prompts, responses)):
        lq_all = F.log_softmax(response_logits(student, p, y), -1)
        lq = lq_all.gather(1, y[:, None])[:, 0]
        ratio = torch.exp(lq - lq_old[b]) * w[b]
        a = adv[b, : len(y)]
        if opd:
            pg = pg - (a * ratio).sum()
        else:
            pg = pg + torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - EPS, 1 + EPS)).sum()
        lp_all = F.log_softmax(t_logits[b], -1)
        kl = (lq_all.exp() * (lq_all - lp_all)).sum(-1)
        single = single + ((w[b] * kl).sum() if paper else 0.0 if opd else kl.sum())
    pg, single = pg / n_tokens, single / n_tokens

    pt_kd = 0.0 if paper else PT_KD
    pt = torch.zeros((), dtype=torch.float64)
    n_pt = sum(len(c) - 1 for c in chunks)
    for c in ([] if opd else chunks):
        lq_all = F.log_softmax(student(input_ids=c[None]).logits[0, :-1], -1)
        with torch.no_grad():
            p_all = F.softmax(teacher(input_ids=c[None]).logits[0, :-1, :shared], -1)
        ce = -lq_all.gather(1, c[1:, None])[:, 0]
        soft = -(p_all * lq_all).sum(-1)
        pt = pt + ((1 - pt_kd) * ce + pt_kd * soft).sum()
    pt = pt / n_pt

    loss = pg + single + pt
    loss.backward()
    out = {
        "logq_old": torch.cat(lq_old).float(), "logp": torch.cat(lp).float(), "importance": torch.cat(w).float(),
        "rewards": torch.cat(rewards).float(), "advantages": adv.float(),
        "pg": pg.detach().reshape(1), "single": single.detach().reshape(1), "pt": pt.detach().reshape(1),
        "loss": loss.detach().reshape(1),
    }
    for name, param in student.named_parameters():
        out[f"grad.{name}"] = param.grad.float()
    print(f"{preset}: pg {pg.item():.6f}, single {single.item():.6f}, pt {pt.item():.6f}")
    return out


if __name__ == "__main__":
    main()
