"""Tiny Shakespeare with a byte-level BPE trained on its training split, sized like the char recipe
(its 2400 steps and evaluations took 20 minutes on a 2-core CPU, docs/recipes_table.md). Compare
the two by bits per byte (`gptzoo eval`).

    gptzoo train recipes/bpe_shakespeare.py

Vocabulary size, measured (2026-11-25, 150 steps of this recipe each, 2 shared CPU cores, whole
validation split; `gptzoo prepare` reports bytes/token):

    vocab_size   val bytes/token   val bits/byte after 150 steps
       512           1.877              2.867
      1024           2.257              2.802
      2048           2.561              2.710
      4096           2.903              2.620

Short runs favour the larger vocabularies (each step covers more text). 2,048 is the choice: 4,096
would split the 1 MB training text into only ~350k tokens (about 28 epochs in 2,400 steps, ~85
occurrences per token type) with an embedding as large as the rest of the model, where
overfitting is likely; compare the two over the full run before changing it.

Full run (2,400 steps, idle machine): val 2.340 bits/byte, against 2.175 for the char recipe; it
overfits already (train loss 2.59, val 4.15 per token), so a smaller vocabulary, fewer steps or
dropout is the next thing to try on a text this small.
"""

from gptzoo.models import gpt2
from gptzoo.recipe import DataConfig, ModelConfig, OptimizerConfig, TrainerConfig

model = ModelConfig(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0)
data = DataConfig(tokenizer="bpe", vocab_size=2048)
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): 7,502 -> 9,007 tokens/s on a
# 2-core CPU (A/B of the train step, 2026-11-27).
trainer = TrainerConfig(max_steps=2400, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)


def build_model(model: ModelConfig, vocab_size: int, *, key):
    return gpt2(vocab_size, **vars(model), key=key)  # ModelConfig's fields are gpt2's arguments
