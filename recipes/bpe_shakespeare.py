"""Tiny Shakespeare with a byte-level BPE trained on its training split, sized like the char recipe
(docs/recipes_table.md). Compare the two by bits per byte (`gptzoo eval`).

    gptzoo train recipes/bpe_shakespeare.py

The vocabulary size of 2,048 was chosen by comparing 512 to 4,096 (docs/benchmarks.md, "BPE
vocabulary size"): larger ones cover more text per step but overfit a text this small.
"""

from gptzoo.models import gpt2
from gptzoo.recipe import DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainerConfig

model = ModelConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0)
data = DataConfig(tokenizer="bpe", vocab_size=2048)
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=2400, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
mesh = MeshConfig(cpu_devices=2)  # two CPU devices, as char_shakespeare.py (docs/scaling.md)


def build_model(model: ModelConfig, vocab_size: int, *, key):
    return gpt2(vocab_size, **vars(model), key=key)  # ModelConfig's fields are gpt2's arguments
