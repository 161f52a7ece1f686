"""Mixtral-style character model on tiny Shakespeare: llama_shakespeare.py's attention, norms and
rotary positions, with each feed-forward a mixture of 4 SwiGLU experts of which every character
goes through 2 (Jiang et al. 2024). Each expert is half as wide as llama_shakespeare's SwiGLU, so
a token's feed-forward costs as much as there while the layer holds twice the parameters. The
training loss adds 0.02 times the load-balancing loss, logged as `aux_loss`.

    gptzoo train recipes/mixtral_shakespeare.py
    gptzoo train recipes/mixtral_shakespeare.py --set model.experts_per_token=1  # Switch-style
"""

from gptzoo.models import MixtralConfig
from gptzoo.recipe import DataConfig, OptimizerConfig, TrainerConfig

# Built in: the model is gptzoo.models.mixtral(vocab_size, **model fields), and the run directory
# reloads from its recipe.json without executing Python.
architecture = "mixtral"
model = MixtralConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0,
                      n_kv_heads=2,  # key/value heads shared by groups of query heads
                      n_experts=4, experts_per_token=2,
                      d_hidden=176,  # per expert: 2 x 176 = llama_shakespeare's 352 per token
                      router_aux_loss_coef=0.02,  # Mixtral 8x7B's
                      use_bias=False, tie_head=False)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=1500, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
