"""Text generation from a trained model."""

from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.data import CharTokenizer
from gptzoo.errors import GptzooError


def sample_logits(logits: Float[Array, " vocab"], key: PRNGKeyArray, temperature: float,
                  top_k: int | None) -> Int[Array, ""]:
    """Greedy when `temperature == 0`; otherwise softmax(logits / T), restricted to the top k."""
    if temperature == 0:
        return jnp.argmax(logits)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature)


@eqx.filter_jit
def _next_token(model, window: Int[Array, " block"], length: Int[Array, ""], key: PRNGKeyArray,
                temperature: float, top_k: int | None) -> Int[Array, ""]:
    # The window is padded on the right: causality makes the padding invisible to position length-1.
    logits = model(window)[length - 1]
    return sample_logits(logits, key, temperature, top_k)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 0:
        raise GptzooError(f"--max-new-tokens={max_new_tokens} is negative; pass 0 or more")
    if temperature < 0:
        raise GptzooError(f"--temperature={temperature} is negative; pass 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise GptzooError(f"--top-k={top_k} must be at least 1; omit it to sample from all tokens")


def stream(model, tokenizer: CharTokenizer, prompt: str = "", *, max_new_tokens: int = 500,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> Iterator[str]:
    """Yield the generated text piece by piece (the prompt is not repeated)."""
    check_sampling_args(max_new_tokens, temperature, top_k)
    context = list(tokenizer.encode(prompt)) if prompt else [0]
    block_size = model.block_size
    key = jax.random.PRNGKey(seed)
    for i in range(max_new_tokens):
        window = context[-block_size:]
        padded = np.zeros(block_size, dtype=np.int32)
        padded[: len(window)] = window
        token = int(_next_token(model, jnp.asarray(padded), jnp.int32(len(window)),
                                jax.random.fold_in(key, i), float(temperature), top_k))
        context.append(token)
        yield tokenizer.decode([token])


def generate(model, tokenizer: CharTokenizer, prompt: str = "", **kwargs) -> str:
    """The prompt followed by `max_new_tokens` generated characters. See `stream` for options."""
    return prompt + "".join(stream(model, tokenizer, prompt, **kwargs))
