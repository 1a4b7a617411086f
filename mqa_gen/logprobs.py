"""Logprobs of generated tokens, reported in the shape of OpenAI's ``logprobs.content``.

Each generated token's logprob is the log-softmax, at that token, of the logits the sampler saw
(after the logits processors such as the repetition penalty, before temperature and the
top-k/top-p/min-p filters), as vLLM reports raw logprobs and llama-server its pre-sampling
``n_probs``; the alternatives are the most likely tokens of the same distribution
(:func:`~mqa_gen.sampling.top_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    """A generated token, its logprob (natural log) and the most likely alternatives
    ``[(token_id, logprob), …]``, best first (empty when none were asked for)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


def openai_logprobs(tokenizer: Tokenizer, tokens: list[TokenLogprob]) -> dict:
    """``{"content": [{id, token, logprob, top_logprobs: [{id, token, logprob}, …]}, …]}``, one
    entry per generated token; ``token`` is the token's own text (a token holding part of a UTF-8
    character shows U+FFFD there, as OpenAI's ``token`` field does; ``id`` is exact)."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"id": token_id, "token": tokenizer.decode([token_id]), "logprob": logprob}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
                        for t in tokens]}
