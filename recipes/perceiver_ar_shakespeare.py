"""Perceiver AR character model on tiny Shakespeare (Hawthorne et al. 2022): a 512-character
context read by one cross-attention layer into 128 latents, then 4 causal self-attention blocks
over the latents alone. Each window trains on its last n_latents characters only. Its 1400 steps
and evaluations took 14 minutes on a 2-core CPU (docs/recipes_table.md).

    gptzoo train recipes/perceiver_ar_shakespeare.py
    gptzoo train recipes/perceiver_ar_shakespeare.py --set model.n_latents=64
"""

from gptzoo.models import PerceiverARConfig
from gptzoo.recipe import DataConfig, OptimizerConfig, TrainerConfig

# Built in: the model is gptzoo.models.perceiver_ar(vocab_size, **model fields), and the run
# directory reloads from its recipe.json without executing Python.
architecture = "perceiver_ar"
model = PerceiverARConfig(n_layers=4, n_heads=4, d_model=128, block_size=512,
                          n_latents=128,  # the context's last positions: latents, predicted
                          dropout=0.0)
data = DataConfig()
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out (trainer.unroll_layers): faster steps for slower
# compiles (docs/benchmarks.md, "Training speed").
trainer = TrainerConfig(max_steps=1400, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)

