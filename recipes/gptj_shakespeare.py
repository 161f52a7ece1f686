"""GPT-J-style character model on tiny Shakespeare: parallel residual blocks with one shared
LayerNorm, `x + attn(ln(x)) + mlp(ln(x))`, and rotary positions on a quarter of each head's
channels in GPT-J's interleaved layout, with a GELU MLP and an untied head (Wang & Komatsuzaki
2021). Sized like char_shakespeare.py; its 2200 steps and evaluations took 14 minutes on a
2-core CPU (docs/recipes_table.md).

    gptzoo train recipes/gptj_shakespeare.py
    gptzoo train recipes/gptj_shakespeare.py --set model.rotary_fraction=1.0
"""

import dataclasses
import math

import jax

from gptzoo import nn
from gptzoo.models import decoder
from gptzoo.recipe import DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainerConfig


@dataclasses.dataclass
class GPTJConfig(ModelConfig):
    rotary_fraction: float = 0.25  # share of each head's channels that rotate (GPT-J: 64 of 256)


model = GPTJConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0,
                   tie_head=False)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=2200, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
mesh = MeshConfig(cpu_devices=2)  # two CPU devices, as char_shakespeare.py (docs/scaling.md)


def build_model(model: GPTJConfig, vocab_size: int, *, key):
    d, head_dim = model.d_model, model.d_model // model.n_heads
    out_std = 0.02 / math.sqrt(2 * model.n_layers)  # GPT-2's init, as in char_shakespeare.py

    def block(k):
        attn_key, mlp_key = jax.random.split(k)
        rotary = nn.Rotary(head_dim, fraction=model.rotary_fraction, interleaved=True)
        return nn.ParallelBlock(
            attn_norm=nn.LayerNorm(d, use_bias=model.use_bias),
            attention=nn.CausalSelfAttention(
                d, model.n_heads, positional=rotary, dropout=model.dropout,
                use_bias=model.use_bias, out_init_std=out_std, key=attn_key),
            mlp=nn.MLP(d, dropout=model.dropout, use_bias=model.use_bias, out_init_std=out_std,
                       key=mlp_key),
            mlp_norm=None,  # attention and MLP read the same normalised input
        )

    return decoder(vocab_size, block=block, n_layers=model.n_layers, d_model=d,
                   block_size=model.block_size, final_norm=nn.LayerNorm(d, use_bias=model.use_bias),
                   positions=None, tie_head=model.tie_head, dropout=model.dropout,
                   scan_layers=model.scan_layers, key=key)
