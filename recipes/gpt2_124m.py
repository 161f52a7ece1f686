"""GPT-2 small (124M parameters): 12 layers, 12 heads, 768 wide, 1,024 positions, trained as
nanoGPT and llm.c train it: AdamW 6e-4 with warm-up and cosine decay, ~0.5M tokens per optimizer
step (512 sequences of 1,024), bfloat16 compute over float32 master weights, layers stacked,
rematerialised and unrolled, parameters and optimizer state sharded over every device (FSDP).

Point it at your corpus and, if you have it, GPT-2's own tokenizer file:

    gptzoo train recipes/gpt2_124m.py --set data.path='owt/*.jsonl' \\
        --set data.tokenizer=gpt2/tokenizer.json
    gptzoo tune-batch recipes/gpt2_124m.py   # the largest micro-batch this device holds

Without a tokenizer file it trains a byte-level BPE of GPT-2's size on the training split. The
vocabulary is padded to 50,304 (a multiple of 128) so the embedding and head matmuls tile well.
`trainer.grad_accum_steps` splits each 512-sequence batch into micro-batches of 64; take the
value `gptzoo tune-batch` prints for your device. Looping the layers
(`trainer.unroll_layers=false`) compiles a deep model much faster and trains slower; keeping every
activation (`trainer.remat=none`) trains faster and needs more memory (docs/benchmarks.md).
"""

from gptzoo.models import GPT2Config
from gptzoo.recipe import DataConfig, MeshConfig, OptimizerConfig, TrainerConfig

architecture = "gpt2"
model = GPT2Config(n_layers=12, n_heads=12, d_model=768, block_size=1024, dropout=0.0,
                   vocab_size=50304)
data = DataConfig(tokenizer="bpe", vocab_size=50257)  # tiny Shakespeare until you set data.path
optimizer = OptimizerConfig(lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, weight_decay=0.1,
                            beta1=0.9, beta2=0.95, grad_clip=1.0)
# 19,073 steps of 524,288 tokens: 10B tokens, nanoGPT's and llm.c's GPT-2 small run.
trainer = TrainerConfig(max_steps=19073, batch_size=512, grad_accum_steps=8,
                        precision="bfloat16", remat="dots_with_no_batch_dims_saveable",
                        unroll_layers=True,
                        eval_interval=250, eval_steps=20, checkpoint_interval=1000,
                        log_interval=10, steps_per_call=10, seed=1337)
mesh = MeshConfig(data=1, fsdp=-1)  # FSDP over every device; --set mesh.data=... to mix
