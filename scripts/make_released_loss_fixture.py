#!/usr/bin/env python3
"""The released MiniLLM loss, called as released, on a minibatch collated the released way.

    python scripts/make_released_loss_fixture.py LMOPS_DIR
        # LMOPS_DIR: a checkout of github.com/microsoft/LMOps (MIT); writes
        # tests/fixtures/losses/released_loss.safetensors

The script imports `minillm/minillm/losses.py` from the checkout (its distributed and
model-parallel helpers stubbed: one process, no model parallelism) and calls
`Loss.ppo_loss` — `_get_advantages_and_returns` (discounted returns, length normalisation,
whitening), `_pg_loss` and `_reg_loss` — on a `PPORLBatch` built by the released
`PPORolloutStorage.collate`: four rollouts taken from two generation batches, each response
(ending with EOS) stored at its generation batch's width (7 and 6 tokens), then right-padded
across the minibatch. The whitening therefore averages over a [4, 7] tensor although the
longest response in the minibatch has 3 tokens. Models: the `gpt2` fixture (student) and the `llama`
fixture (teacher, its logits restricted to the 384 shared ids); α = 0.2 importance weights.
Pad = EOS = 0, as for GPT-2: the released mask (`tokens != pad` on the input side) then
covers exactly the response tokens and their EOS, our responses' tokens.
"""
import importlib
import os
import sys
import types

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
ALPHA, GAMMA, SCALING, REWARD_CLIP, CLIP = 0.2, 0.95, 0.5, 100.0, 0.2
PAD = 0


def import_released(lmops):
    """`losses`, `storages` and `data_types` of the released package, without its
    `__init__` (which needs deepspeed) and with one-process stand-ins for its helpers."""
    tt = types.ModuleType("torchtyping")

    class TensorType:
        def __class_getitem__(cls, _):
            return torch.Tensor

    tt.TensorType = TensorType
    sys.modules["torchtyping"] = tt
    mpu = types.ModuleType("transformers.mpu")
    sys.modules["transformers.mpu"] = mpu
    transformers.mpu = mpu
    top = types.ModuleType("utils")
    top.all_gather = lambda x, dim=0, world_size=1, group=None: x
    top.print_rank = print
    top.get_rank = lambda: 0
    sys.modules["utils"] = top
    pkg = types.ModuleType("released")
    pkg.__path__ = [os.path.join(lmops, "minillm", "minillm")]
    sys.modules["released"] = pkg
    return (importlib.import_module("released.losses"), importlib.import_module("released.storages"),
            importlib.import_module("released.data_types"))


def load(name):
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", name), attn_implementation="eager")
    return m.double().eval()


def forward(model, query, response):
    """Logits over the released layout [query | response] (left-padded queries, right-padded
    responses): each row runs on its real tokens alone (what the released left-padded forward
    with position ids computes; transformers' eager llama gives NaN on fully masked rows in
    float64), pad positions get zero logits."""
    tokens = torch.cat([query, response], dim=1)
    rows = []
    for row in tokens:
        real = row.ne(PAD).nonzero()[:, 0]
        first, last = real.min().item(), real.max().item() + 1
        logits = model(input_ids=row[first:last][None]).logits[0]
        rows.append(F.pad(logits, (0, 0, first, tokens.size(1) - last)))
    return torch.stack(rows)


def main(lmops):
    losses, storages, data_types = import_released(lmops)
    student, teacher = load("gpt2"), load("llama")
    shared = student.config.vocab_size
    g = torch.Generator().manual_seed(5)
    # Two generation batches of four responses (real tokens, then EOS); each batch stores its
    # responses at its longest, padded with pad = EOS. The released mask marks the positions
    # whose *input* is real (tokens != pad, shifted by one): the response tokens and the EOS.
    gen_lens = [[6, 0, 2, 4], [5, 1, 3, 2]]
    picked = [(0, 1), (0, 2), (1, 1), (1, 3)]  # the minibatch: 1, 3, 2 and 3 tokens with EOS
    elements, kept = [], []
    for b, lens in enumerate(gen_lens):
        width = max(lens) + 1
        prompts = [torch.randint(1, shared, (int(n),), generator=g) for n in torch.randint(2, 6, (4,), generator=g)]
        q_width = max(len(p) for p in prompts)
        query = torch.full((4, q_width), PAD)
        response = torch.full((4, width), PAD)
        for i, (p, n) in enumerate(zip(prompts, lens)):
            query[i, q_width - len(p):] = p
            response[i, :n] = torch.randint(1, shared, (n,), generator=g)
        mask = torch.cat([query, response], 1).ne(PAD).float()[:, q_width - 1:-1]
        with torch.no_grad():
            s = F.log_softmax(forward(student, query, response)[:, q_width - 1:-1, :shared], -1)
            t = F.log_softmax(forward(teacher, query, response)[:, q_width - 1:-1, :shared], -1)
        lq = s.gather(-1, response[..., None])[..., 0] * mask
        lp = t.gather(-1, response[..., None])[..., 0] * mask
        w = torch.exp(lq - torch.log((1 - ALPHA) * lq.exp() + ALPHA * lp.exp())) * mask
        rewards = torch.clip((lp - lq) / SCALING, -REWARD_CLIP, REWARD_CLIP) * mask
        for i, n in enumerate(lens):
            if (b, i) in picked:
                kept.append((query[i][query[i].ne(PAD)], response[i, :n + 1], width))
                elements.append(data_types.PPORLElement(
                    query_tensor=query[i], response_tensor=response[i], lens=n + 1, s_lens=n + 1, mask=mask[i],
                    logprobs=lq[i], rewards=rewards[i], rev_kl=torch.zeros(width), w=w[i],
                    inf_mask=torch.zeros(width, shared, dtype=torch.bool), t_rewards=lp[i], ent_rewards=-lq[i]))

    storage = storages.PPORolloutStorage(PAD, seed=0)
    batch = storage.collate(elements)
    assert batch.response_tensors.shape[1] == 7 and batch.mask.sum() == 9, batch.mask
    assert not torch.isnan(batch.rewards).any() and not torch.isnan(batch.w).any(), (batch.rewards, batch.w)

    class Trainer:
        max_length = 1 << 20
        dp_world_size, dp_group = 1, None

        class tokenizer:
            pad_token_id = PAD

        def get_mask(self, tokens):
            return tokens.ne(PAD).long()

        def compute_logits_and_log_probs(self, query_ids, response_ids, inf_mask=None, base="base",
                                         return_logprobs=True):
            model = teacher if base == "teacher" else student
            logits = forward(model, query_ids, response_ids)[:, :, :shared]
            start = query_ids.size(1) - 1
            logits = logits[:, start:start + response_ids.size(1)]
            assert not return_logprobs
            return logits

    args = types.SimpleNamespace(gamma=GAMMA, cliprange=CLIP, temperature=1.0, model_parallel=False,
                                 single_step_reg=True, length_norm=True)
    loss_fn = losses.Loss(args, Trainer())
    student.zero_grad()
    logits = forward(student, batch.query_tensors, batch.response_tensors)[:, :, :shared]
    loss, stats = loss_fn.ppo_loss(batch, logits)
    loss.backward()
    mask = Trainer().get_mask(torch.cat([batch.query_tensors, batch.response_tensors], 1))[
        :, batch.query_tensors.size(1) - 1:-1].float()
    advantages = loss_fn._get_advantages_and_returns(batch.rewards, batch.response_tensors.shape[1], mask)

    out = {
        "prompts": torch.cat([q for q, _, _ in kept]).int(),
        "prompt_lens": torch.tensor([len(q) for q, _, _ in kept]).int(),
        "responses": torch.cat([r for _, r, _ in kept]).int(),
        "response_lens": torch.tensor([len(r) for _, r, _ in kept]).int(),
        "generation_widths": torch.tensor([w for _, _, w in kept]).int(),
        "advantages": advantages.float(),
        "pg": torch.tensor([stats["pg_loss"]]), "single": torch.tensor([stats["reg_loss"]]),
        "loss": loss.detach().float().reshape(1),
    }
    for name, param in student.named_parameters():
        out[f"grad.{name}"] = param.grad.float()
    path = os.path.join(FIX, "losses", "released_loss.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print("wrote", path, f"(pg {stats['pg_loss']:.6f}, single {stats['reg_loss']:.6f})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    main(sys.argv[1])
