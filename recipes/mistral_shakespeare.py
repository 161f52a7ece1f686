"""Mistral-style character model on tiny Shakespeare: LLaMA's layout (RMSNorm, rotary positions,
SwiGLU, grouped-query attention, no biases) with sliding-window attention (Jiang et al. 2023):
each position attends to the 64 most recent characters of a 256-character block, so a layer's
attention costs grow with block x window, and stacked layers still reach about 4 x 64 back.

    gptzoo train recipes/mistral_shakespeare.py
    gptzoo sample --ckpt runs/mistral_shakespeare --prompt "ROMEO:" --max-new-tokens 1000

Sampling past the block slides the rolling cache of each layer's 64 keys (`--context slide`, the
default for a sliding-window model), which decodes exactly what the model computes over the
whole history.
"""

from gptzoo.models import LlamaConfig
from gptzoo.recipe import DataConfig, OptimizerConfig, TrainerConfig

# Built in: the model is gptzoo.models.llama(vocab_size, **model fields), and the run directory
# reloads from its recipe.json without executing Python.
architecture = "llama"
model = LlamaConfig(n_layers=4, n_heads=4, d_model=128, block_size=256, dropout=0.0,
                    n_kv_heads=2,  # key/value heads shared by groups of query heads
                    sliding_window=64,  # how many most recent positions a query sees
                    multiple_of=32, use_bias=False, tie_head=False)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# Half llama_shakespeare's batch of twice its block: the same characters per step, for 60% of
# its steps. The stacked layers' scan written out (trainer.unroll_layers): faster steps for
# slower compiles.
trainer = TrainerConfig(max_steps=1200, batch_size=16, eval_interval=200, eval_steps=20,
                        checkpoint_interval=400, seed=1337, unroll_layers=True)
