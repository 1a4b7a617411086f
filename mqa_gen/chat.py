"""Chat prompts: render a model's Jinja chat template, and know which tokens end a turn.

A GGUF file stores its chat template (``tokenizer.chat_template``) as the Jinja source the model's
authors wrote for Hugging Face transformers. We render it the way transformers'
``apply_chat_template`` does (``trim_blocks`` and ``lstrip_blocks`` on, the loop-controls
extension, ``raise_exception`` / ``strftime_now`` helpers and a ``tojson`` filter that does not
HTML-escape), inside jinja2's immutable sandbox, because a template comes from a downloaded file
and is untrusted code. Reference: transformers ``utils/chat_template_utils.py``; Jinja sandbox:
https://jinja.palletsprojects.com/en/stable/sandbox/.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Tokens that close an assistant turn, by chat format. Only ones the vocabulary marks special count,
# so a plain-text token that happens to be spelled the same is never taken for one.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: SmolLM2, Qwen
    "<end_of_turn>",  # Gemma
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 after a tool call
    "<|end|>",  # Phi-3
    "<|endoftext|>",  # GPT-2-style end of document; SmolLM2's base-model EOS
)


class _TemplateRaised(TemplateError):
    """What ``raise_exception(msg)`` raises inside a template: the template's own refusal."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, except that touching an unsafe attribute (``x.__class__``) fails at
    once. jinja2's default hands back an Undefined that renders as "", which would hide an escape
    attempt behind a silently wrong prompt."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        kind = type(obj).__name__
        raise SecurityError(f"access to attribute {attribute!r} of a {kind!r} object is not allowed")


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    # Templates such as Llama 3.1's write today's date into the system prompt.
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts need the JSON as it is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render a conversation with a Jinja chat template into the prompt text.

    Args:
        template: the Jinja source (a GGUF's ``tokenizer.chat_template``).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` in order.
        add_generation_prompt: end with the header that opens the assistant's turn.
        bos_token, eos_token: the text of those tokens, for templates that write them.

    Returns the prompt as text; special tokens appear as their text (``"<|im_start|>"``), which
    :meth:`mqa_gen.tokenizer.Tokenizer.encode` turns back into single ids.

    Raises:
        ChatTemplateError: the template does not parse, fails while rendering, calls
            ``raise_exception``, or tries an operation the sandbox forbids (unsafe attributes,
            mutating a list). The message is one line.
    """
    try:
        compiled = _compile(template)
    except TemplateSyntaxError as e:
        message = f"chat template does not parse: {_one_line(e.message)} (line {e.lineno})"
        raise ChatTemplateError(message) from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not parse: {_one_line(e.message)}") from None
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template refused the conversation: {_one_line(e.message)}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {_one_line(e.message)}") from None
    except Exception as e:  # anything else a template can raise: UndefinedError, TypeError, ...
        message = e.message if isinstance(e, TemplateError) else str(e)
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {_one_line(message)}") from None


def end_of_turn_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids at which generation in chat mode stops: the EOS id (if any) and every special token of
    :data:`END_OF_TURN_TOKENS` the vocabulary has (``<|im_end|>`` for ChatML, ``<end_of_turn>``
    for Gemma, ...). llama.cpp keeps a similar "end of generation" set (``special_eog_ids``)."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    for text in END_OF_TURN_TOKENS:
        token_id = tokenizer.token_to_id(text)
        if token_id is not None and tokenizer.is_special(token_id):
            ids.add(token_id)
    return ids


def render_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, str]],
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """:func:`render_chat` with a tokenizer's chat template (or ``template``, e.g. from
    ``--chat-template-file``) and its BOS and EOS token texts as ``bos_token`` and ``eos_token``,
    as transformers' ``apply_chat_template`` passes them (an absent token is ``""``). Every
    caller that turns a conversation into a prompt goes through here.

    Raises:
        ChatTemplateError: neither a ``template`` nor one in the model; or as :func:`render_chat`.
    """
    template = template if template is not None else tokenizer.chat_template
    if template is None:
        raise ChatTemplateError("this model has no chat template (give one with --chat-template-file)")

    def text(token_id: int | None) -> str:
        return tokenizer.decode([token_id]) if token_id is not None else ""

    return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=text(tokenizer.bos_id), eos_token=text(tokenizer.eos_id))


def _one_line(message: str | None) -> str:
    lines = (message or "").strip().splitlines()
    return lines[0] if lines else "(no message)"
