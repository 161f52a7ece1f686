"""Text generation: prefill the prompt in one pass, then a compiled decode loop over a KV cache.

A model is a `LanguageModel` (`gptzoo.models.protocol`). One that is also a `CachedDecoder`
whose parts allow it (`cacheable`) is decoded from its KV cache; any other (Perceiver AR, a
model with a spatial gating unit) is sampled by recomputing its context every token.

What the context is once it holds `block_size` tokens (`context`):
  "shift": keep its last `keep` fraction, re-encode those tokens at positions 0.. in one prefill
     and continue from the cache (llama.cpp's context shift): the cost per token stays flat;
  "crop": the last `block_size` tokens, recomputed every token (nanoGPT's `generate`);
  "slide": the cache keeps the last `block_size` positions of every layer (rotary/ALiBi only);
     exact for a model with a sliding window, whose rolling cache holds the window.
None (the default) is "slide" for a sliding-window model decoded from its cache, else "shift".

The parts, one idea each: `settings` (the `Sampling` settings and the argument checks), `pick`
(a token from logits), `programs` (the compiled steps: `prefill`, `decode_chunk`, `shift`),
`layout` (the model's decoding form and the cache slots a chunk reads), `loop` (the host's
loop, `generate_tokens`) and `text` (`generate`, `stream`, `stream_batch`).
"""

from gptzoo.sample.loop import BUCKET, generate_tokens
from gptzoo.sample.pick import pick_token, sample_logits
from gptzoo.sample.programs import CHUNK, State, decode_chunk, prefill, shift
from gptzoo.sample.settings import (
    CONTEXTS,
    Sampling,
    check_context,
    check_sampling_args,
    default_context,
)
from gptzoo.sample.text import TextStream, generate, stream, stream_batch

__all__ = ["BUCKET", "CHUNK", "CONTEXTS", "Sampling", "State", "TextStream", "check_context",
           "check_sampling_args", "decode_chunk", "default_context", "generate", "generate_tokens",
           "pick_token", "prefill", "sample_logits", "shift", "stream", "stream_batch"]
