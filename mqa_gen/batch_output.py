"""The output lines of ``mqa-gen batch``: one JSON object per prompt, the same whether the prompt ran
in this process or on a Ray actor (:mod:`mqa_gen.cli.batch_ray`).

A finished prompt gives ``{"id", "prompt_tokens", "token_ids", "text", "finish_reason", "seed"}``
(plus ``logprobs`` in OpenAI's shape when asked); a line that could not run (``--skip-bad``) gives
``{"id", "error": {"line", "message"}}``. Writing them in order, and ``--resume``, live in
:mod:`mqa_gen.cli.batch`.
"""

from __future__ import annotations


def result_line(completion, item_id, tokenizer) -> dict:
    """The output object of one finished prompt.

    Args:
        completion: its :class:`~mqa_gen.scheduler.Completion`.
        item_id: the input line's ``id`` (a string or an integer; the line number when it gave none).
        tokenizer: the model's :class:`~mqa_gen.tokenizer.Tokenizer` (token texts for ``logprobs``).
    """
    from .logprobs import openai_logprobs

    obj = {"id": item_id, "prompt_tokens": len(completion.request.prompt_ids), "token_ids": completion.token_ids,
           "text": completion.text, "finish_reason": completion.finish_reason, "seed": completion.request.params.seed}
    if completion.logprobs is not None:
        obj["logprobs"] = openai_logprobs(tokenizer, completion.logprobs)
    return obj


def error_line(bad) -> dict:
    """The output object of a line that could not run (``--skip-bad``): ``bad`` is its
    :class:`~mqa_gen.batch_input.BadLine`."""
    return {"id": bad.id, "error": {"line": bad.line, "message": bad.message}}
