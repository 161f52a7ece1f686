"""char_shakespeare.py with ALiBi in place of learned positions (Press et al. 2022): pre-norm
GPT-2 blocks whose attention scores are biased by `-slope_h * distance`, so a model trained on
128-character windows also reads longer ones. `model.head_qk=true` adds the head-QK trick
(BlinkDL, RWKV). Its 1900 steps and evaluations took 12 minutes on a 2-core CPU
(docs/recipes_table.md).

    gptzoo train recipes/alibi_shakespeare.py
    gptzoo train recipes/alibi_shakespeare.py --set model.head_qk=true
"""

import dataclasses
import math

import jax

from gptzoo import nn
from gptzoo.models import decoder
from gptzoo.recipe import DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainerConfig


@dataclasses.dataclass
class AlibiConfig(ModelConfig):
    head_qk: bool = False  # extra logits that copy or avoid tokens seen earlier in the window


model = AlibiConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=1900, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
mesh = MeshConfig(cpu_devices=2)  # two CPU devices, as char_shakespeare.py (docs/scaling.md)


def build_model(model: AlibiConfig, vocab_size: int, *, key):
    d = model.d_model
    out_std = 0.02 / math.sqrt(2 * model.n_layers)  # GPT-2's init, as in char_shakespeare.py
    blocks_key, qk_key = jax.random.split(key)

    def block(k):
        attn_key, mlp_key = jax.random.split(k)
        return nn.Block(
            attn_norm=nn.LayerNorm(d, use_bias=model.use_bias),
            attention=nn.CausalSelfAttention(
                d, model.n_heads, positional=nn.ALiBi(model.n_heads), dropout=model.dropout,
                use_bias=model.use_bias, out_init_std=out_std, key=attn_key),
            mlp_norm=nn.LayerNorm(d, use_bias=model.use_bias),
            mlp=nn.MLP(d, dropout=model.dropout, use_bias=model.use_bias, out_init_std=out_std,
                       key=mlp_key),
        )

    head_qk = nn.HeadQK(d, vocab_size, key=qk_key) if model.head_qk else None
    return decoder(vocab_size, block=block, n_layers=model.n_layers, d_model=d,
                   block_size=model.block_size, final_norm=nn.LayerNorm(d, use_bias=model.use_bias),
                   positions=None, tie_head=model.tie_head, dropout=model.dropout,
                   head_qk=head_qk, scan_layers=model.scan_layers, key=blocks_key)
