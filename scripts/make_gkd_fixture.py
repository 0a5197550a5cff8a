#!/usr/bin/env python3
"""GKD's loss from TRL itself: `GKDTrainer.generalized_jsd_loss` (PyPI trl, pinned below) on
the fixture models' logits, its value and the gradient for every student parameter.

    pip install trl==1.16.0 && python scripts/make_gkd_fixture.py
        # writes tests/fixtures/losses/gkd.safetensors

Student: the `gpt2` fixture (float64); teacher: the `llama` fixture, its logits restricted to
the 384 ids the two share (TRL needs equal vocabularies). Four (prompt, response) pairs, the
responses ending with EOS; each sequence runs on its own. As in `GKDTrainer.compute_loss`,
the logits at the positions before the response tokens and the response tokens as labels
(everything else -100) go into `generalized_jsd_loss(beta, temperature)` with its default
`batchmean` reduction (the mean over response tokens). Cases: (β, τ) = (0, 1), (1, 0.9),
(0.5, 0.9), (0.1, 2).
"""
import os

import torch
import transformers
import trl
from safetensors.torch import save_file
from trl.experimental.gkd.gkd_trainer import GKDTrainer

TRL_VERSION = "1.16.0"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
CASES = [(0.0, 1.0), (1.0, 0.9), (0.5, 0.9), (0.1, 2.0)]


def load(name):
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", name), attn_implementation="eager")
    return m.double().eval()


def main():
    assert trl.__version__ == TRL_VERSION, f"made with trl {TRL_VERSION}, found {trl.__version__}"
    student, teacher = load("gpt2"), load("llama")
    shared = student.config.vocab_size
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, shared, (n,), generator=g) for n in (3, 5, 2, 4)]
    responses = [torch.cat([torch.randint(1, shared, (n,), generator=g), torch.tensor([0])]) for n in (4, 1, 6, 3)]
    width = max(len(p) + len(y) for p, y in zip(prompts, responses))

    def logits(model, grad):
        rows, labels = [], []
        for p, y in zip(prompts, responses):
            ids = torch.cat([p, y])
            with torch.set_grad_enabled(grad):
                z = model(input_ids=ids[None]).logits[0, :, :shared]
            # Position t predicts token t + 1: keep the positions before each response token.
            lab = torch.full((len(ids),), -100)
            lab[len(p) - 1: len(ids) - 1] = y
            pad = width - len(ids)
            rows.append(torch.nn.functional.pad(z, (0, 0, 0, pad)))
            labels.append(torch.nn.functional.pad(lab, (0, pad), value=-100))
        return torch.stack(rows), torch.stack(labels)

    out = {
        "prompts": torch.cat(prompts).int(), "prompt_lens": torch.tensor([len(p) for p in prompts]).int(),
        "responses": torch.cat(responses).int(), "response_lens": torch.tensor([len(y) for y in responses]).int(),
    }
    t_logits, labels = logits(teacher, False)
    for k, (beta, tau) in enumerate(CASES):
        student.zero_grad()
        s_logits, _ = logits(student, True)
        loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta, temperature=tau)
        loss.backward()
        out[f"case{k}.beta_tau"] = torch.tensor([beta, tau])
        out[f"case{k}.loss"] = loss.detach().float().reshape(1)
        for name, param in student.named_parameters():
            out[f"case{k}.grad.{name}"] = param.grad.float()
        print(f"β {beta}, τ {tau}: loss {loss.item():.6f}")
    path = os.path.join(FIX, "losses", "gkd.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
