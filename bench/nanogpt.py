"""nanoGPT's model and `generate` (Karpathy, model.py), trimmed to what sampling runs, for the
end-to-end comparison in bench_sample.py: random weights of a given shape, `generate` from a
prompt of character ids, timed from process start to exit by the caller. `train_step` is nanoGPT's
training step (train.py: AdamW, global-norm clipping at 1.0, loss over every position) for
bench_train.py's comparison.

    python bench/nanogpt.py --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --tokens 500
"""

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=False):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std)

    def hidden(self, idx):
        t = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx):
        return self.lm_head(self.hidden(idx)[:, [-1], :])  # inference: the last position only

    def loss(self, idx, targets):
        logits = self.lm_head(self.hidden(idx))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:]
            logits = self(idx_cond)[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


def train_step(model, *, compile_model: bool, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99)):
    """nanoGPT's step as train.py runs it on CPU: forward with targets, backward, clip, AdamW
    (weight decay on matrices only). Returns `step(idx, targets) -> loss`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    loss_fn = torch.compile(model.loss) if compile_model else model.loss

    def step(idx, targets):
        loss = loss_fn(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main():
    parser = argparse.ArgumentParser()
    for name, default in [("n-layer", 6), ("n-head", 6), ("n-embd", 384), ("block-size", 256),
                          ("vocab-size", 65), ("tokens", 500), ("prompt-length", 6)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.manual_seed(1337)
    model = GPT(args.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd).eval()
    start = time.perf_counter()
    model.generate(torch.zeros((1, args.prompt_length), dtype=torch.long), args.tokens)
    print(f"generate: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
