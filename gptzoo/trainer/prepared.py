"""What a training run needs before its first step, built from the recipe alone: the corpus and
its batches, the mesh, the model and optimizer placed on it, what trains (every array, or LoRA's
adapters), and the compiled train chunk."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import optax

from gptzoo.data import Batches, Corpus, Tokenizer, prepare_corpus
from gptzoo.errors import GptzooError
from gptzoo.lora.training import Trainable, trainable
from gptzoo.models.protocol import AuxLossModel, LanguageModel, LinearHeadModel, require
from gptzoo.nn.stack import with_scan_settings
from gptzoo.recipe import Recipe
from gptzoo.trainer.distributed import main_first
from gptzoo.trainer.init_from import Initial
from gptzoo.trainer.optimizer import make_optimizer
from gptzoo.trainer.sharding import build_sharded, check_fits, chunk_sharded, make_mesh, shard
from gptzoo.trainer.step import estimate_loss, make_train_chunk


@dataclass
class Prepared:
    """Everything a run needs before its first step, built from the recipe alone."""

    corpus: Corpus
    tokenizer: Tokenizer
    train_batches: Batches
    val_batches: Batches  # the in-training estimate's
    mesh: jax.sharding.Mesh
    model: LanguageModel
    optimizer: optax.GradientTransformation
    opt_state: optax.OptState
    train_key: jax.Array
    train_chunk: Callable
    trained: Trainable  # every array, or LoRA's adapters

    def validation_estimate(self, model, step: int, eval_steps: int) -> dict[str, float]:
        """`val_loss` and `val_bpb` on `eval_steps` batches of the validation split, different
        at each evaluation step and the same in a resumed run."""
        batches = self.val_batches.on_devices(step * eval_steps, eval_steps,
                                              chunk_sharded(self.mesh))
        loss = float(estimate_loss(model, batches, self.mesh))
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.corpus.val.bytes_per_token}


def prepare(recipe: Recipe, log=print, init_from: str | Path | None = None) -> Prepared:
    """`init_from`: a run directory whose weights and tokenizer the model starts from."""
    cfg, block_size = recipe.trainer, recipe.model.block_size
    mesh = make_mesh(recipe.mesh)
    schedule = check_fits(recipe, mesh.devices.shape)  # before the corpus: fails fast
    initial = Initial.load(init_from) if init_from else None
    corpus = main_first(lambda: prepare_corpus(recipe.data, initial.tokenizer if initial else None,
                                               log=log))
    tokenizer = corpus.tokenizer
    corpus.train.require(max(schedule.sizes) * block_size + 1,
                         f"one batch (trainer.batch_size x model.block_size + 1 = "
                         f"{max(schedule.sizes)} x {block_size} + 1)")
    train_batches = Batches(corpus.train, schedule, block_size, cfg.seed)
    val_batches = Batches(corpus.val, cfg.batch_size, block_size, cfg.seed + 1)
    model_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))

    def build():
        return with_scan_settings(  # per block of each Stack
            recipe.build(tokenizer.vocab_size, key=model_key), cfg.remat, cfg.unroll_layers)

    if initial:  # its weights fill the recipe's model: none are drawn to be replaced
        model = shard(initial.weights_into(eqx.filter_eval_shape(build)), mesh)
    else:
        model = build_sharded(build, mesh)
    require(model, LanguageModel, f"gptzoo train ({recipe.source.name})")
    model, trained = trainable(recipe, model, initial, key=jax.random.fold_in(model_key, 1))
    if cfg.head_chunk:
        check_head_chunk(model)
    model = shard(model, mesh)  # the adapters too
    optimizer = make_optimizer(recipe.optimizer, cfg.max_steps)
    # Placed before a resume restores into them: a restored array keeps its template's sharding.
    opt_state = shard(optimizer.init(trained.partition(model)[0]), mesh)
    train_chunk = make_train_chunk(optimizer, mesh, precision=cfg.precision,
                                   grad_accum_steps=cfg.grad_accum_steps,
                                   partition=trained.partition, head_chunk=cfg.head_chunk)
    return Prepared(corpus, tokenizer, train_batches, val_batches, mesh, model, optimizer,
                    opt_state, train_key, train_chunk, trained)


def check_head_chunk(model) -> None:
    """One line unless `trainer.head_chunk` applies to `model`: a `LinearHeadModel` whose loss
    has no auxiliary term."""
    require(model, LinearHeadModel, "trainer.head_chunk", fix="set trainer.head_chunk=0")
    if isinstance(model, AuxLossModel):
        raise GptzooError(f"trainer.head_chunk does not apply to {type(model).__name__}, whose "
                          "loss adds an auxiliary loss; set trainer.head_chunk=0")
    try:
        model.head_weight()
    except ValueError as e:
        raise GptzooError(f"trainer.head_chunk: {e}; set trainer.head_chunk=0") from None
