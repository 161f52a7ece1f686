"""Qwen3-style character model on tiny Shakespeare: LLaMA's layout (RMSNorm, rotary positions,
SwiGLU, no biases) with QK-norm, an RMSNorm of each head's queries and keys before rotary (Qwen
Team 2025), grouped-query attention of 4 query heads over 2 key/value heads, heads of 64 channels
whatever d_model (4 x 64 = 2 x d_model, as Qwen3-0.6B's 16 x 128 are twice its 1,024), and a
head tied to the embedding. Half llama_shakespeare.py's steps: its wider heads and the norms
make each step slower.

    gptzoo train recipes/qwen3_shakespeare.py
    gptzoo train recipes/qwen3_shakespeare.py --set model.qk_norm=none  # without QK-norm
"""

from gptzoo.models import LlamaConfig
from gptzoo.recipe import DataConfig, MeshConfig, OptimizerConfig, TrainerConfig

# Built in: the model is gptzoo.models.llama(vocab_size, **model fields), and the run directory
# reloads from its recipe.json without executing Python. With a Hugging Face tokenizer
# (data.tokenizer=bpe) it exports as Qwen3ForCausalLM.
architecture = "llama"
model = LlamaConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0,
                    n_kv_heads=2,  # key/value heads shared by groups of query heads
                    head_dim=64,  # not d_model / n_heads = 32
                    qk_norm="head",  # RMSNorm of each head's queries and keys
                    multiple_of=32, use_bias=False, tie_head=True)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=1000, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
mesh = MeshConfig(cpu_devices=2)  # two CPU devices, as char_shakespeare.py (docs/scaling.md)
