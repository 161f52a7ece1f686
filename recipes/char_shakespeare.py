"""Character-level GPT on tiny Shakespeare, sized to train on a 2-core CPU in under 10 minutes.

    gptzoo train recipes/char_shakespeare.py
    gptzoo train recipes/char_shakespeare.py --set trainer.max_steps=200 --set model.n_layers=2
"""

from gptzoo.models import GPT2Config
from gptzoo.recipe import DataConfig, MeshConfig, OptimizerConfig, TrainerConfig

# Built in: the model is gptzoo.models.gpt2(vocab_size, **model fields), and the run directory
# reloads from its recipe.json without executing Python.
architecture = "gpt2"
model = GPT2Config(n_layers=4, n_heads=4, d_model=128, block_size=128, dropout=0.0)
data = DataConfig()  # the tiny Shakespeare copy shipped inside the package
optimizer = OptimizerConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=100, weight_decay=0.1)
# The stacked layers' scan written out: on a CPU XLA runs a few blocks written out faster than a
# loop over them; scanning pays where compile time grows with depth (docs/scan-and-remat.md).
trainer = TrainerConfig(max_steps=2400, batch_size=32, eval_interval=250, eval_steps=20,
                        checkpoint_interval=500, seed=1337, unroll_layers=True)
# On a CPU, two devices each running half of every batch: XLA:CPU keeps two cores busier that way
# than by splitting each of this small model's operations over both (docs/scaling.md).
mesh = MeshConfig(cpu_devices=2)
