"""Mixture of experts (Shazeer et al. 2017) as Mixtral routes it: a router picks `top_k` of
`n_experts` SwiGLU feed-forwards for each token and sums their outputs, weighted by its softmax
renormalised over the chosen ones; and the Switch Transformer's load-balancing loss (Fedus et al.
2021) that keeps the experts evenly used."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.experts import PATHS, Experts, expert_path
from gptzoo.nn.linear import Linear


class RouterStats(eqx.Module):
    """What the load-balancing loss needs of one or more routers' decisions, as sums, so that the
    statistics of several layers (or batches) add up to theirs together.

    - `expert_counts`: `(n_experts,)`, how many times each expert was among a token's top k.
    - `prob_sum`: `(n_experts,)`, the router's softmax probabilities summed over the tokens.
    - `n_tokens`: how many tokens were routed.

    Any leading axes (layers, batches) are summed over by `load_balancing_loss`.
    """

    expert_counts: Float[Array, "*sums experts"]
    prob_sum: Float[Array, "*sums experts"]
    n_tokens: Float[Array, "*sums"]

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return jax.tree.map(jnp.add, self, other)


@typecheck
def route(
    logits: Float[Array, "rows experts"], top_k: int
) -> tuple[Int[Array, "rows k"], Float[Array, "rows k"], RouterStats]:
    """Mixtral's routing of each row: its `top_k` experts by softmax probability (in float32
    whatever the logits' dtype) and their probabilities renormalised to sum to 1, with the
    rows' `RouterStats`."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, choices = jax.lax.top_k(probs, top_k)
    n_experts = logits.shape[-1]
    stats = RouterStats(jax.nn.one_hot(choices, n_experts, dtype=jnp.float32).sum((0, 1)),
                        probs.sum(0), jnp.asarray(logits.shape[0], jnp.float32))
    return choices, top / top.sum(-1, keepdims=True), stats


@typecheck
def load_balancing_loss(stats: RouterStats) -> Float[Array, ""]:
    """The Switch Transformer's auxiliary loss as transformers' `load_balancing_loss_func`:
    `n_experts * sum_e f_e * P_e`, `f_e` the share of top-k choices that went to expert e and
    `P_e` its mean router probability, per token (`f` sums to `top_k`, `P` to 1). It is `top_k`
    when choices and probabilities are spread evenly over the experts, and grows as they
    concentrate on the same ones.

    Over several layers, pass their stats summed (a `Stack` of `MoEBlock`s returns them so): as
    transformers concatenates every layer's router logits before taking the means, this is not
    the mean of the per-layer losses. Its gradient reaches the router through `P` only.
    """
    n_experts = stats.prob_sum.shape[-1]
    counts = stats.expert_counts.reshape(-1, n_experts).sum(0)
    prob_sum = stats.prob_sum.reshape(-1, n_experts).sum(0)
    n_tokens = stats.n_tokens.sum()
    return n_experts * jnp.sum(counts / n_tokens * (prob_sum / n_tokens))


class MoEMLP(eqx.Module):
    """A sparse mixture-of-experts feed-forward, Mixtral's `MixtralSparseMoeBlock`: a bias-free
    router `Linear(d_model, n_experts)` and `Experts`, each token through its `top_k` experts.

    **Arguments:**

    - `d_model`: input and output width.
    - `n_experts`: how many experts.
    - `top_k`: experts per token.
    - `d_hidden`: each expert's hidden width (Mixtral's `intermediate_size`).
    - `activation`: the experts' gate activation, "silu" (SwiGLU) or "gelu".
    - `path`: how the experts run (`gptzoo.nn.experts`): "auto" (`expert_path`'s choice for the
        platform and the number of tokens), "blocks", "ragged" or "dense" (every expert on
        every token: the reference).
    - `dropout`: dropout on the output, active when a `key` is given.
    - `init_std`, `out_init_std`: standard deviations of the router and experts' input weights,
        and of the experts' output weights, at initialisation.
    - `key`: initialisation key.

    Called on `(*batch, seq, d_model)`, it returns the output and the tokens' `RouterStats`. Every
    token counts in the statistics, as in transformers without an attention mask (its training).
    """

    router: Linear
    experts: Experts
    dropout: eqx.nn.Dropout
    top_k: int = eqx.field(static=True)
    path: str = eqx.field(static=True)

    def __init__(
        self, d_model: int, *, n_experts: int, top_k: int, d_hidden: int,
        activation: str = "silu", path: str = "auto", dropout: float = 0.0,
        init_std: float = 0.02, out_init_std: float = 0.02, key: PRNGKeyArray,
    ):
        router_key, experts_key = jax.random.split(key)
        self.router = Linear(d_model, n_experts, use_bias=False, init_std=init_std,
                             key=router_key)
        self.experts = Experts(n_experts, d_model, d_hidden, activation=activation,
                               init_std=init_std, out_init_std=out_init_std, key=experts_key)
        self.dropout = eqx.nn.Dropout(dropout)
        self.top_k = top_k
        self.path = path

    def __check_init__(self):
        n_experts = self.router.weight.shape[1]
        if not 1 <= self.top_k <= n_experts:
            raise ValueError(f"MoEMLP top_k={self.top_k} must be between 1 and n_experts="
                             f"{n_experts}; choose how many experts each token goes through")
        if self.path not in ("auto", *PATHS):
            raise ValueError(f"MoEMLP path={self.path!r} is unknown; choose auto, "
                             f"{', '.join(PATHS)}")

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None,
        path: str | None = None,
    ) -> tuple[Float[Array, "*batch seq d_model"], RouterStats]:
        """The output and the tokens' `RouterStats`; `path`, when given, replaces the layer's
        own for this call."""
        rows = x.reshape(-1, x.shape[-1])
        choices, weights, stats = route(self.router(rows), self.top_k)
        path = expert_path(self.path if path is None else path, choices.size,
                           self.experts.n_experts)
        y = self.experts(rows, choices, weights, path=path).reshape(x.shape)
        return self.dropout(y, key=key, inference=key is None), stats

