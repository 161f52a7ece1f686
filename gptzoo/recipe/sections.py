"""The sections of a recipe besides the model's: their fields, defaults and the checks their
values must pass (the model section is the family's config, `gptzoo.models.config`)."""

import dataclasses
import math

from gptzoo.data.text import SHAKESPEARE
from gptzoo.lora.config import LORA_CHECKS, LoRAConfig
from gptzoo.models import ModelConfig
from gptzoo.nn.stack import REMAT_POLICIES


@dataclasses.dataclass
class DataConfig:
    path: str = str(SHAKESPEARE)  # a text file, a folder, a glob, or JSONL files
    val_fraction: float = 0.1
    tokenizer: str = "char"  # char, bytes, bpe (trained on the training split), or a tokenizer.json
    vocab_size: int = 1024  # bpe only
    text_field: str = "text"  # JSONL files: the field holding each document's text
    cache_dir: str = ""  # where token shards go; "" = $GPTZOO_CACHE or ~/.cache/gptzoo


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # global-norm clipping; 0: none (nanoGPT's meaning)


@dataclasses.dataclass
class TrainerConfig:
    max_steps: int = 2000
    batch_size: int = 32
    eval_interval: int = 250
    eval_steps: int = 20
    checkpoint_interval: int = 500
    log_interval: int = 10
    steps_per_call: int = 10  # train steps fused into one jitted call with lax.scan
    keep_checkpoints: int = 3
    keep_best: bool = False  # also RUN_DIR/best: the step of the lowest val loss so far
    max_bad_steps: int = 20  # non-finite steps in a row (each skipped) before the run stops
    seed: int = 0
    wandb: bool = False  # also log to Weights & Biases (pip install -e .[wandb])
    wandb_project: str = "gptzoo"
    precision: str = "float32"  # float32, or bfloat16 compute over float32 master weights
    remat: str = "none"  # none, full, or a jax.checkpoint_policies name, per block
    unroll_layers: bool = False  # scanned layers written out: slower compiles, faster steps
    # positions per chunk of the head fused with the loss (only a chunk's logits in memory); 0: off
    head_chunk: int = 0
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size stays the global)
    # [(step, batch size), ...]: the global batch from each listed step on; None: batch_size
    batch_schedule: list | None = None

    def due(self, step: int, interval: int) -> bool:
        """Whether `step` is one of an `interval`'s: its multiples, and the last step."""
        return step % interval == 0 or step == self.max_steps


@dataclasses.dataclass
class MeshConfig:
    """How the devices are arranged: the batch is split over data x fsdp x expert, parameters and
    optimizer state over fsdp, attention heads and MLP width over tensor, a mixture's experts over
    expert. -1 takes the devices left.

    `cpu_devices` splits a CPU into that many JAX devices when training starts before any other
    JAX call (the batch is then split over them like over GPUs): XLA:CPU runs the devices' shares
    of a step side by side, which keeps two cores busier on a small model than splitting each
    operation over both (`gptzoo.trainer.distributed.split_cpu`). GPUs and TPUs ignore it."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    cpu_devices: int = 1


SECTIONS = ("model", "data", "optimizer", "trainer", "mesh", "lora")
DEFAULTS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "trainer": TrainerConfig, "mesh": MeshConfig, "lora": LoRAConfig}
# (key, predicate, what it must be) checked after overrides, so bad values fail before training.
CHECKS = [
    ("trainer.max_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.batch_size", lambda v: v > 0, "a positive integer"),
    ("trainer.eval_interval", lambda v: v > 0, "a positive integer"),
    ("trainer.eval_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.checkpoint_interval", lambda v: v > 0, "a positive integer"),
    ("trainer.log_interval", lambda v: v > 0, "a positive integer"),
    ("trainer.steps_per_call", lambda v: v > 0, "a positive integer"),
    ("trainer.keep_checkpoints", lambda v: v > 0, "a positive integer"),
    ("trainer.max_bad_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.grad_accum_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.precision", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    ("trainer.head_chunk", lambda v: v >= 0, "0 (off) or a positive number of positions"),
    ("trainer.remat", lambda v: v in REMAT_POLICIES, f"one of {', '.join(REMAT_POLICIES)}"),
    ("mesh.cpu_devices", lambda v: v > 0, "a positive number of devices"),
    ("trainer.seed", lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
    ("optimizer.lr", lambda v: 0 < v < math.inf, "positive and finite"),
    ("optimizer.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optimizer.warmup_steps", lambda v: v >= 0, "0 or more"),
    ("optimizer.weight_decay", lambda v: 0 <= v < math.inf, "0 or more, finite"),
    ("optimizer.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.grad_clip", lambda v: 0 <= v < math.inf, "0 (off) or a positive, finite norm"),
    ("model.n_layers", lambda v: v > 0, "a positive integer"),
    ("model.n_heads", lambda v: v > 0, "a positive integer"),
    ("model.d_model", lambda v: v > 0, "a positive integer"),
    ("model.block_size", lambda v: v > 0, "a positive integer"),
    ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("data.vocab_size", lambda v: v > 256, "above 256 (the byte alphabet and <|endoftext|>)"),
    *LORA_CHECKS,
]
