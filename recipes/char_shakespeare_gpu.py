"""nanoGPT's `shakespeare_char` model for GPU users: 6 layers, 6 heads, 384 wide, 256 context.

    gptzoo train recipes/char_shakespeare_gpu.py

nanoGPT reports val loss 1.4697 for this shape, the lowest of its 5000 iterations on an A100,
keeping only the checkpoint of that evaluation: on 1M characters the model overfits. On one H100
gptzoo's val loss (50 batches) was lowest at step 1,500, 1.4520, and 1.6613 by step 4,250, so the
recipe keeps its best step too (`trainer.keep_best`):

    gptzoo sample --ckpt runs/char_shakespeare_gpu/best
"""

from gptzoo.models import gpt2
from gptzoo.recipe import DataConfig, ModelConfig, OptimizerConfig, TrainerConfig

model = ModelConfig(n_layers=6, n_heads=6, d_model=384, block_size=256, dropout=0.2,
                    use_bias=False)
data = DataConfig()
optimizer = OptimizerConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1,
                            beta1=0.9, beta2=0.99, grad_clip=1.0)
# The stacked layers' scan written out: faster steps on a GPU (docs/benchmarks.md, "On one
# H100").
trainer = TrainerConfig(max_steps=5000, batch_size=64, eval_interval=250, eval_steps=50,
                        checkpoint_interval=1000, seed=1337, unroll_layers=True,
                        precision="bfloat16", keep_best=True)  # bfloat16: nanoGPT's on GPUs


def build_model(model: ModelConfig, vocab_size: int, *, key):
    return gpt2(vocab_size, **vars(model), key=key)  # ModelConfig's fields are gpt2's arguments
