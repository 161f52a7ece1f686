import optax

from gptzoo.nn.stack import map_layers
from gptzoo.recipe import OptimizerConfig


def make_schedule(cfg: OptimizerConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    warmup = min(cfg.warmup_steps, max_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(max_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, max_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (none at `grad_clip` 0, as in nanoGPT); weight decay on
    matrices only (not biases, norm scales)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            make_schedule(cfg, max_steps), b1=cfg.beta1, b2=cfg.beta2,
            weight_decay=cfg.weight_decay,
            mask=lambda params: map_layers(lambda p: p.ndim >= 2, params),  # per layer
        ),
    )
