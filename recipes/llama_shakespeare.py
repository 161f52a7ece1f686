"""LLaMA-style character model on tiny Shakespeare: RMSNorm, rotary positions, SwiGLU and
grouped-query attention, no biases and an untied head (Touvron et al. 2023). Sized like
char_shakespeare.py; its 2000 steps and evaluations took 12 minutes on a 2-core CPU
(docs/recipes_table.md).

    gptzoo train recipes/llama_shakespeare.py
    gptzoo train recipes/llama_shakespeare.py --set model.n_kv_heads=1  # multi-query attention
"""

from gptzoo.models import LlamaConfig
from gptzoo.recipe import DataConfig, MeshConfig, OptimizerConfig, TrainerConfig

# Built in: the model is gptzoo.models.llama(vocab_size, **model fields), and the run directory
# reloads from its recipe.json without executing Python.
architecture = "llama"
model = LlamaConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0,
                    n_kv_heads=2,  # key/value heads shared by groups of query heads
                    multiple_of=32,  # SwiGLU hidden width rounded up to this (LLaMA: 256)
                    use_bias=False, tie_head=False)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=2000, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
mesh = MeshConfig(cpu_devices=2)  # two CPU devices, as char_shakespeare.py (docs/scaling.md)
