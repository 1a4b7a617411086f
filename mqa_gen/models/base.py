"""The generic decoder-only transformer every architecture module builds (as mlx-lm's models share
one shape and nanoGPT's ``GPT.forward`` reads as the equations):

    h⁰ = E[tokens] · embed_scale                      embedding          (N, d_model)
    hˡ⁺¹ = blockˡ(hˡ)                                  ℓ = 0 .. L−1: attention, MLP, norms, residuals
    logits = RMSNorm(hᴸ) W_outᵀ                        output head        (B or N, vocab)

A forward step runs B sequences at once (:class:`~mqa_gen.batch.Batch`): their new tokens are laid
end to end as N rows through every block, each sequence attending over its own KV cache at its own
positions. What an architecture adds — its config extras from GGUF metadata, its tensor names and
shapes, its block — lives in its own module (:mod:`mqa_gen.models.llama`,
:mod:`mqa_gen.models.gemma3`), found through the registry in :mod:`mqa_gen.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np

from ..attention import DecodeScratch
from ..batch import Batch
from ..cache import KVCache
from ..config import ModelConfig
from ..kernels import rmsnorm
from ..linear import SMALL_BATCH
from ..thread_governor import governor, one_numba_thread, prefill_threads


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of float32 [N, d] rows with gain ``weight`` [d] (Zhang & Sennrich 2019); returns a
    new float32 [N, d]."""
    out = np.empty_like(x)
    rmsnorm(x, weight, eps, out)
    return out


class Decoder:
    """A decoder-only transformer over a stack of blocks.

    Args:
        config: the model's :class:`~mqa_gen.config.ModelConfig`.
        embeddings: [vocab_size, d_model] (``rows(ids)`` looks tokens up; a :mod:`mqa_gen.linear`
            object). blocks: one callable ``block(x [N, d_model], batch) → [N, d_model]`` per layer;
            the last is also called as ``block(x, batch, last_only=True) → [B, d_model]`` in a
            prefill, returning each sequence's last row only (llama's block shows how).
        final_norm: float32 [d_model]. output: [vocab_size, d_model] (the embeddings when tied).
        embed_scale: factor on the embedding rows (Gemma scales them by √d_model).
    """

    def __init__(self, config: ModelConfig, embeddings, blocks: list, final_norm: np.ndarray, output,
                 embed_scale: float = 1.0):
        self.config = config
        self.embeddings, self.blocks = embeddings, list(blocks)
        self.final_norm, self.output = final_norm, output
        self.embed_scale = embed_scale
        self._scratch: DecodeScratch | None = None
        self.int8_dot = False  #: whether int8 dot products are on (:meth:`set_int8_dot`)

    def replace(self, *, config: ModelConfig | None = None, blocks: list | None = None) -> "Decoder":
        """A new decoder sharing this one's weights, with another config and/or blocks (regrouped
        KV heads, instrumented blocks)."""
        new = type(self)(config or self.config, self.embeddings, blocks if blocks is not None else self.blocks,
                         self.final_norm, self.output, self.embed_scale)
        new.int8_dot = self.int8_dot  # the matrices are shared, and so is their mode
        return new

    def set_int8_dot(self, on: bool) -> None:
        """Switch int8 dot products (:mod:`mqa_gen.kernels.int8_dot`: activations rounded to 8 bits
        per block of 32, integer codes multiplied, as llama.cpp does) on or off for every
        quantised matrix of the blocks and the output head. Off, the default, keeps float32
        products (logits as transformers'). Embedding lookups are unchanged either way.

        Raises:
            FastPathUnavailable: on, on a CPU without AVX2.
        """
        matrices = [getattr(part, name, None) for block in self.blocks
                    for part in (getattr(block, "attention", None), getattr(block, "mlp", None))
                    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
        for matrix in matrices + [self.output]:
            if hasattr(matrix, "set_int8_dot"):
                matrix.set_int8_dot(on)
        self.int8_dot = on

    def new_cache(self, max_seq_len: int | None = None, dtype="f32") -> KVCache:
        """An empty KV cache for one sequence of this model (ring buffers for sliding-window
        layers); ``max_seq_len`` defaults to the context length, ``dtype`` is a storage name."""
        c = self.config
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_seq_len or c.context_length, dtype,
                       c.layer_windows)

    def preload_kernels(self) -> None:
        """Run a 2-token prefill into a throwaway float32 cache (the CLI's default cache type), so
        Numba loads that path's kernel specialisations from its disk cache now (0.2–0.3 s in a
        fresh process) rather than inside the user's time to first token.
        :func:`mqa_gen.loading.load` calls it while the tokenizer builds on its other thread. The
        decode step's kernels are left to the first decode step: a 1-token run needs none."""
        self.forward(np.zeros(2, np.int64), self.new_cache(2))

    def forward(self, tokens, cache, all_logits: bool = False):
        """Run new tokens through the model and store their K/V rows in the cache(s).

        One sequence: ``tokens`` int [T], ``cache`` a :class:`~mqa_gen.cache.KVCache`; returns
        float32 [vocab_size] (the last position's logits), or [T, vocab_size] with ``all_logits``.

        B sequences: ``tokens`` a list of B int sequences (lengths may differ) or an int [B, T]
        array, ``cache`` a list of B caches; returns float32 [B, vocab_size] (each sequence's last
        position), or with ``all_logits`` a list of B arrays [T_b, vocab_size]. Sequence b's new
        tokens sit at positions cache[b].length ..; when every sequence brings one token this is a
        decode step (:meth:`decode`).

        Raises:
            ValueError: an empty sequence, tokens that do not fit a cache, an id outside the
                vocabulary, or a cache whose dimensions are not the model's.
        """
        if isinstance(cache, KVCache):
            out = self.forward_batch([tokens], [cache], all_logits)
            return out[0]
        return self.forward_batch(list(tokens), list(cache), all_logits)

    def decode(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One decode step for B sequences: token b (int) goes to caches[b]. Every weight matrix is
        read once for all B rows. Returns float32 [B, vocab_size]."""
        return self.forward_batch([[t] for t in tokens], list(caches))

    def forward_batch(self, chunks: list, caches: list[KVCache], all_logits: bool = False):
        """:meth:`forward` for B sequences: ``chunks`` B int sequences, ``caches`` B caches.

        NumPy's overflow and invalid-value warnings are off in here: garbage weights can overflow
        a product to ±inf or NaN, which the caller finds in the logits and reports as one error
        (:meth:`mqa_gen.generate.TokenSequence.check_logits`), not as warnings on stderr."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._forward_batch(chunks, caches, all_logits)

    def _forward_batch(self, chunks: list, caches: list[KVCache], all_logits: bool):
        c = self.config
        chunks = [np.asarray(t, dtype=np.int64).reshape(-1) for t in chunks]
        if len(chunks) != len(caches):
            raise ValueError(f"{len(chunks)} token sequences for {len(caches)} caches")
        for cache in caches:
            if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (c.n_layers, c.n_kv_heads, c.head_dim):
                raise ValueError(f"the cache has {cache.n_layers} layers × {cache.n_kv_heads} KV heads × "
                                 f"{cache.head_dim}, the model {c.n_layers} × {c.n_kv_heads} × {c.head_dim}")
        if any(t.shape[0] == 0 for t in chunks):
            raise ValueError("forward needs at least one token per sequence")
        tokens = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)  # (N,)
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise ValueError("token id outside the vocabulary")
        batch = Batch(caches, [t.shape[0] for t in chunks], c.head_dim)
        if batch.decode:
            batch.scratch = self._decode_scratch(max(cache.max_seq_len for cache in caches), batch.size)

        if batch.decode:
            gov = governor()  # decode steps pick their thread count by timing
            threads = gov.step(batch.size) if gov is not None else nullcontext()
        elif tokens.shape[0] > SMALL_BATCH and not self.int8_dot:
            threads = one_numba_thread()  # BLAS multiplies the weights: Numba's kernels keep off its cores
        else:  # Numba's kernels multiply the weights (with int8 dot products on, at any length)
            threads = prefill_threads()  # on the threads no other task crowds
        with threads:
            x = self.embeddings.rows(tokens)  # (N, d_model)
            if self.embed_scale != 1.0:
                x *= np.float32(self.embed_scale)
            *early, last = self.blocks
            for block in early:
                x = block(x, batch)  # (N, d_model)
            if all_logits or batch.decode:
                x = last(x, batch)  # (N, d_model)
            else:  # only each sequence's last row goes on: the last layer computes those alone
                x = last(x, batch, last_only=True)  # (B, d_model)
            batch.advance()
            logits = self.output(rms_norm(x, self.final_norm, c.norm_eps))  # (B or N, vocab)
        if all_logits:
            return [logits[batch.rows(b)] for b in range(batch.size)]
        return logits

    def _decode_scratch(self, max_seq_len: int, batch_size: int) -> DecodeScratch:
        c = self.config
        if self._scratch is None or not self._scratch.fits(c.n_heads, c.head_dim, max_seq_len, batch_size):
            self._scratch = DecodeScratch(c.n_heads, c.head_dim, max_seq_len, batch_size)
        return self._scratch
