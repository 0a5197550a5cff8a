#!/usr/bin/env python3
"""PyTorch references for minillm's losses (values and gradients), written from the
definitions in ../shared/reference/REFERENCE.md, independently of the Rust code.

    python scripts/make_loss_fixtures.py     # writes tests/fixtures/losses/*.safetensors

Divergences: random student/teacher logits (odd sizes: 7 rows × 11 and 2 rows × 50,257, one of them masked),
per-row weights with zeros (masked rows); loss = Σ_r w_r D(p_r, q_r) and its gradient with
respect to the student logits, in float64.
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "losses")


def kl(log_a, log_b):
    """Σ a (log a − log b) over the last dim."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def divergences():
    def mix(wa, la, wb, lb):
        return torch.log(wa * la.exp() + wb * lb.exp())

    return {
        "fkl": lambda lq, lp: kl(lp, lq),
        "sce": lambda lq, lp: -(lp.exp() * lq).sum(-1),
        "rkl": lambda lq, lp: kl(lq, lp),
        "jsd_0.3": lambda lq, lp: 0.3 * kl(lp, mix(0.3, lp, 0.7, lq)) + 0.7 * kl(lq, mix(0.3, lp, 0.7, lq)),
        "tvd": lambda lq, lp: 0.5 * (lq.exp() - lp.exp()).abs().sum(-1),
        "sfkl_0.1": lambda lq, lp: kl(lp, mix(0.1, lp, 0.9, lq)),
        "srkl_0.2": lambda lq, lp: kl(lq, mix(0.2, lq, 0.8, lp)),
    }


def build_divergences():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for case, (rows, vocab, scale) in {"small": (7, 11, 3.0), "gpt2vocab": (2, 50257, 4.0)}.items():
        z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
        t = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
        w = torch.rand(rows, generator=g, dtype=torch.float64)
        w[1] = 0.0  # a masked row
        tensors[f"{case}.student"] = z.float()
        tensors[f"{case}.teacher"] = t.float()
        tensors[f"{case}.weights"] = w.float()
        y = torch.randint(0, vocab, (rows,), generator=g)
        tensors[f"{case}.labels"] = y.int()
        zz = z.float().double().requires_grad_(True)
        ce = (F.cross_entropy(zz, y, reduction="none") * w.float().double()).sum()
        ce.backward()
        tensors[f"{case}.ce.loss"] = ce.detach().reshape(1)
        tensors[f"{case}.ce.grad"] = zz.grad.float()
        for name, fn in divergences().items():
            zz = z.float().double().requires_grad_(True)
            lq = F.log_softmax(zz, -1)
            lp = F.log_softmax(t.float().double(), -1)
            loss = (fn(lq, lp) * w.float().double()).sum()
            loss.backward()
            tensors[f"{case}.{name}.loss"] = loss.detach().reshape(1)
            tensors[f"{case}.{name}.grad"] = zz.grad.float()
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "divergences.safetensors"))


def build_optimizer():
    """torch.optim.AdamW (decay on the matrix only), clip_grad_norm_ and a warm-up + cosine
    schedule with a floor, over 5 steps with given gradients."""
    import math
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, generator=g)
    b = torch.randn(3, generator=g)
    grads = [(torch.randn(5, 3, generator=g), torch.randn(3, generator=g)) for _ in range(5)]
    lr, warmup, total, min_lr = 0.1, 2, 5, 0.01

    def factor(k):
        if k < warmup:
            return k / max(1, warmup)
        progress = (k - warmup) / max(1, total - warmup)
        c = max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        return (min_lr + (lr - min_lr) * c) / lr

    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = torch.optim.AdamW([{"params": [pw], "weight_decay": 0.1}, {"params": [pb], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    out = {"w0": w, "b0": b}
    for k, (gw, gb) in enumerate(grads):
        pw.grad, pb.grad = gw.clone(), gb.clone()
        norm = torch.nn.utils.clip_grad_norm_([pw, pb], 1.5)
        opt.step()
        sched.step()
        out[f"gw{k}"], out[f"gb{k}"] = gw, gb
        out[f"w{k + 1}"], out[f"b{k + 1}"] = pw.detach().clone(), pb.detach().clone()
        out[f"norm{k}"] = norm.reshape(1)
    save_file(out, os.path.join(OUT, "adamw.safetensors"))


def build_minillm_terms():
    """The MiniLLM loss terms on a fixed rollout batch, written from REFERENCE.md §2-4 in the
    released implementation's padded [batch, response] layout: rewards, discounted returns
    including r_t, length normalisation by the remaining valid tokens, whitening over the whole
    padded minibatch (torch.var_mean, unbiased), per-token importance weight w = q_old / p~,
    ratio = exp(logq - logq_old) * w, PPO clip; the single-step reverse KL; the PT term."""
    g = torch.Generator().manual_seed(2)
    lens = [4, 2, 5]
    B, R, V = len(lens), max(lens), 13
    alpha, gamma, scaling, clip_r, eps = 0.2, 0.95, 0.5, 100.0, 0.2
    mask = torch.zeros(B, R)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    logits = torch.randn(B, R, V, generator=g, dtype=torch.float64) * 2      # current student
    t_logits = torch.randn(B, R, V, generator=g, dtype=torch.float64) * 2    # teacher
    old_logits = logits + 0.3 * torch.randn(B, R, V, generator=g, dtype=torch.float64)  # sampling-time student
    ids = torch.randint(0, V, (B, R), generator=g)
    lq_old = torch.gather(F.log_softmax(old_logits, -1), -1, ids[..., None])[..., 0] * mask
    lp = torch.gather(F.log_softmax(t_logits, -1), -1, ids[..., None])[..., 0] * mask
    mix = torch.log((1 - alpha) * lq_old.exp() + alpha * lp.exp())
    w = torch.exp(lq_old - mix) * mask
    rewards = torch.clip((lp - lq_old) / scaling, -clip_r, clip_r) * mask
    # returns
    last, rev = 0, []
    for t in reversed(range(R)):
        last = rewards[:, t] + gamma * last
        rev.append(last)
    ret = torch.stack(rev[::-1], 1)
    cum = torch.cumsum(mask, -1)
    remaining = mask - cum + cum[:, -1:]
    remaining = remaining.masked_fill(remaining == 0, 1)
    adv = ret / remaining
    var, mean = torch.var_mean(adv)
    adv = (adv - mean) * torch.rsqrt(var + 1e-8)
    x = logits.float().double().requires_grad_(True)
    lq = torch.gather(F.log_softmax(x, -1), -1, ids[..., None])[..., 0]
    ratio = torch.exp((lq - lq_old) * mask) * w
    n = mask.sum()
    pg = (torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)) * mask).sum() / n
    lqf, lpf = F.log_softmax(x, -1), F.log_softmax(t_logits, -1)
    single = ((lqf.exp() * (lqf - lpf)).sum(-1) * mask).sum() / n
    (pg + single).backward()
    out = {
        "mask": mask, "logits": logits.float(), "t_logits": t_logits.float(), "ids": ids.int(),
        "logq_old": lq_old.float(), "logp": lp.float(), "advantages": adv.float(), "importance": w.float(),
        "pg": pg.detach().reshape(1), "single": single.detach().reshape(1), "grad": x.grad.float(),
    }
    # PT term: 0.5 CE + 0.5 soft CE against the teacher, token-averaged.
    z = torch.randn(6, V, generator=g, dtype=torch.float64).requires_grad_(True)
    tz = torch.randn(6, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (6,), generator=g)
    ce = F.cross_entropy(z, y)
    sce = -(F.softmax(tz, -1) * F.log_softmax(z, -1)).sum(-1).mean()
    pt = 0.5 * ce + 0.5 * sce
    pt.backward()
    out.update({"pt.logits": z.detach().float(), "pt.t_logits": tz.float(), "pt.labels": y.int(),
                "pt.loss": pt.detach().reshape(1), "pt.grad": z.grad.float()})
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "minillm_terms.safetensors"))


if __name__ == "__main__":
    build_divergences()
    build_optimizer()
    build_minillm_terms()
    print("wrote", OUT)
