"""The sampling settings, and the checks of the sampler's arguments."""

from typing import NamedTuple

from gptzoo.errors import GptzooError
from gptzoo.models.protocol import CachedDecoder, LanguageModel, can_decode, require

CONTEXTS = ("shift", "crop", "slide")


class Sampling(NamedTuple):
    """How each token is picked from the logits (`pick_token`); a static argument of the decode
    programs, so each distinct setting compiles its own.

    **Arguments:**

    - `temperature`: the logits are divided by it; 0 picks the most likely token (greedy).
    - `top_k`: only the `top_k` most likely tokens can be picked; None for all.
    - `top_p`: only the smallest set of most likely tokens whose probability reaches `top_p`
        (the nucleus) can be picked; None for all.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None = None,
                        top_p: float | None = None, context: str | None = None,
                        keep: float = 0.5) -> None:
    """Refuse, in one line that names the option and its fix, settings the sampler cannot use."""
    if max_new_tokens < 0:
        raise GptzooError(f"--max-new-tokens={max_new_tokens} is negative; pass 0 or more")
    if temperature < 0:
        raise GptzooError(f"--temperature={temperature} is negative; pass 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise GptzooError(f"--top-k={top_k} must be at least 1; omit it to sample from all tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptzooError(f"--top-p={top_p} must be in (0, 1]; omit it to sample from all tokens")
    if context not in (None, *CONTEXTS):
        raise GptzooError(f"--context={context} is not one of {', '.join(CONTEXTS)}")
    if not 0 < keep <= 1:
        raise GptzooError(f"--keep={keep} must be in (0, 1]: the fraction of the window kept "
                          "when it is full")


def default_context(model: LanguageModel, use_cache: bool = True) -> str:
    """The context mode when none is asked for: "slide" for a model whose attention window is
    narrower than `block_size` (Mistral's sliding window), decoded from its cache, since its
    rolling cache holds the window and sliding decodes what its forward computes over the whole
    history; "shift" for any other."""
    cached = use_cache and can_decode(model) and model.slides_window
    return "slide" if cached and model.context_window < model.block_size else "shift"


def check_context(model: LanguageModel, context: str, use_cache: bool = True) -> None:
    """`context="slide"` needs the cache of a model whose attention carries the positions."""
    if context != "slide":
        return
    if use_cache:
        require(model, CachedDecoder, "--context slide", "use --context shift or crop")
    cached = use_cache and model.cacheable
    if cached and model.slides_window:
        return
    why = "has learned positions, which end at block_size" if cached else (
        "is sampled without a KV cache")
    raise GptzooError(f"--context slide needs a cached model with rotary or ALiBi positions; "
                      f"this one {why}: use --context shift or crop")
