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


if __name__ == "__main__":
    build_divergences()
    build_optimizer()
    print("wrote", OUT)
