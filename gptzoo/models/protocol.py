"""What gptzoo's trainer, evaluator, sampler and exporter need of a model, stated once.

`LanguageModel`: tokens to next-token logits, its block size, how far back it sees and which
positions it predicts. `CachedDecoder`: a `LanguageModel` that also decodes one example's new
tokens from a KV cache. `AuxLossModel`: a `LanguageModel` whose training loss adds an auxiliary
loss (a mixture of experts' load balancing). `LinearHeadModel`: a `LanguageModel` whose logits
are its last hidden states times one matrix, which the trainer may fuse with the loss. All are
runtime-checkable `typing.Protocol`s: a model satisfies them by having the members, whatever its
class. `require` fails with one line naming what a model lacks.
"""

from typing import Protocol, runtime_checkable

from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from gptzoo.errors import GptzooError


@runtime_checkable
class LanguageModel(Protocol):
    """Next-token logits from tokens: what training, evaluation and sampling need."""

    block_size: int  # the longest context it reads: the training window and the sampler's

    @property
    def context_window(self) -> int:
        """How many of the latest positions, its own included, a position's attention reads:
        `block_size`, or a sliding window narrower than it."""

    def n_predicted(self, seq: int) -> int:
        """How many of the last positions of a `seq`-token input it gives logits for: all `seq`
        for a GPT, the latents for Perceiver AR."""

    def __call__(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch n vocab"]:
        """Next-token logits at the last `n = n_predicted(seq)` positions; dropout only with
        `key`."""


@runtime_checkable
class CachedDecoder(LanguageModel, Protocol):
    """A `LanguageModel` that decodes one example's new tokens from a KV cache, so the sampler
    feeds each token once instead of recomputing the context."""

    @property
    def cacheable(self) -> bool:
        """Whether `decode` applies to this instance: False when a part mixes positions outside
        attention (`gptzoo.nn.MixesPositions`); the sampler then recomputes the context."""

    @property
    def slides_window(self) -> bool:
        """True when positions come from attention (rotary, ALiBi), so the cache may slide past
        `block_size`, keeping the last `block_size` positions; False when learned positions end
        at `block_size`, so the sampler shifts or crops the context instead."""

    def init_cache(self) -> PyTree:
        """One example's empty cache, preallocated to `block_size` positions."""

    def decode(
        self, tokens: Int[Array, " seq"], positions: Int[Array, " seq"], cache: PyTree
    ) -> tuple[Float[Array, "seq vocab"], PyTree]:
        """Logits for one example's new `tokens` at `positions`, and the cache extended by
        them."""


@runtime_checkable
class AuxLossModel(LanguageModel, Protocol):
    """A `LanguageModel` whose training loss adds an auxiliary loss of its own forward pass (a
    mixture of experts' load-balancing loss): the trainer minimises the cross-entropy plus
    `aux_loss_coef` times it, and logs it as `aux_loss`; evaluation scores the cross-entropy
    alone."""

    aux_loss_coef: float  # the auxiliary loss's weight in the training loss

    def logits_and_aux(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "*batch n vocab"], Float[Array, ""]]:
        """`__call__`'s logits and the auxiliary loss of the same pass, unweighted (over the
        whole batch: a load-balancing loss pools every token)."""


@runtime_checkable
class LinearHeadModel(LanguageModel, Protocol):
    """A `LanguageModel` whose logits are `hidden_states(tokens) @ head_weight().T`: the trainer
    can then compute the head and the cross-entropy a chunk of positions at a time
    (`trainer.head_chunk`), never holding the whole batch's logits."""

    def hidden_states(
        self, tokens: Int[Array, "*batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch n d_model"]:
        """The head's input at the positions `__call__` predicts."""

    def head_weight(self) -> Float[Array, "vocab d_model"]:
        """The head's matrix; raises `ValueError` (one line) when the model's logits are not a
        linear map of its hidden states alone."""


def can_decode(model) -> bool:
    """Whether the sampler may decode `model` from a KV cache."""
    return isinstance(model, CachedDecoder) and model.cacheable


def members(protocol: type) -> list[str]:
    """The members `protocol` asks for, a method written `name()`, in the order declared (the
    protocols it extends first)."""
    names = []
    for cls in reversed(protocol.__mro__):
        if cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        own = [*getattr(cls, "__annotations__", {}),
               *(n for n in vars(cls) if not n.startswith("_") or n == "__call__")]
        names += [n for n in own if n not in names]
    return names


def require(model, protocol: type, what_for: str,
            fix: str = "add them, or build the model with gptzoo.models.decoder") -> None:
    """Raise a one-line `GptzooError` unless `model` satisfies `protocol`, naming the members it
    lacks, what needed them (`what_for`, e.g. "gptzoo sample") and the `fix`."""
    if isinstance(model, protocol):
        return
    missing = [n + "()" if callable(getattr(protocol, n, None)) else n
               for n in members(protocol) if not hasattr(model, n)]
    raise GptzooError(f"model {type(model).__name__} lacks {', '.join(missing)}; {what_for} "
                      f"needs a {protocol.__name__} (gptzoo.models.protocol): {fix}")
