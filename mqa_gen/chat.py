"""Chat prompts: render a model's Jinja chat template, and know which tokens end a turn.

A GGUF file stores its chat template (``tokenizer.chat_template``) as the Jinja source the model's
authors wrote for Hugging Face transformers. We render it the way transformers'
``apply_chat_template`` does (``trim_blocks`` and ``lstrip_blocks`` on, the loop-controls
extension, ``raise_exception`` / ``strftime_now`` helpers and a ``tojson`` filter that does not
HTML-escape), inside jinja2's immutable sandbox, because a template comes from a downloaded file
and is untrusted code. Reference: transformers ``utils/chat_template_utils.py``; Jinja sandbox:
https://jinja.palletsprojects.com/en/stable/sandbox/.

The sandbox stops a template from reaching files or Python internals, not from exhausting the
machine: ``{{ 'x' * 10**8 }}`` builds 100 MB (and the tokenizer then aborts the process), two
nested ``range`` loops run for hours. So every render has a budget (:class:`_Budget`): at most
:data:`RENDER_BASE_CHARS` plus :data:`RENDER_INPUT_FACTOR` × the conversation's own characters,
for the output and for any one string or list the template builds (``*``, ``+``, ``%``, ``~``,
``**``, filters and method calls are checked, before the operation where the size is known up
front, after it otherwise), and :data:`RENDER_SECONDS` of wall time, checked on every line of
template code (a trace function that sees only the template's own frames). Beyond either, the
render stops with a :class:`~mqa_gen.errors.ChatTemplateError`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import re
import string
import sys
import time
import types
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
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


#: The message roles a conversation may hold (batch lines, serve requests): the ones every shipped
#: template renders. Gemma 3's refuses others mid-render; SmolLM2's would print any word as a role,
#: so "wizard" would pass unnoticed. OpenAI's "tool" and "developer" need templates we do not have.
MESSAGE_ROLES = ("system", "user", "assistant")


def role_problem(role: str) -> str | None:
    """Why ``role`` cannot be a message's role (one line naming the known ones), or None."""
    return None if role in MESSAGE_ROLES else f"unknown message role {role!r} (known: {', '.join(MESSAGE_ROLES)})"

#: Characters a render may produce (and any one value it builds may hold) beyond the conversation's.
RENDER_BASE_CHARS = 2**20
#: Times the conversation's own characters a render may add (a template writes each message once,
#: plus its markup).
RENDER_INPUT_FACTOR = 4
#: Wall time a render may take, in seconds (real templates take milliseconds).
RENDER_SECONDS = 5.0
#: Template-code lines run between two looks at the clock.
_LINES_PER_CLOCK_CHECK = 256


class _TemplateRaised(TemplateError):
    """What ``raise_exception(msg)`` raises inside a template: the template's own refusal."""


class _OverBudget(TemplateError):
    """A render that went past its :class:`_Budget`: the message says which limit."""


class _Budget:
    """The limits of one render: ``max_chars`` (output, and any one value built) and a deadline
    (``time.monotonic()`` seconds)."""

    def __init__(self, max_chars: int, seconds: float):
        self.max_chars = max_chars
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self._lines = _LINES_PER_CLOCK_CHECK

    def size(self, n: int, what: str) -> None:
        """Refuse a value (or output) of ``n`` characters or items beyond ``max_chars``."""
        if n > self.max_chars:
            raise _OverBudget(f"{what} of {n:,} characters/items exceeds the limit of {self.max_chars:,}")

    def value(self, value: Any, what: str) -> Any:
        """``value`` unchanged, unless it is a string, list, tuple or dict beyond ``max_chars``."""
        if isinstance(value, (str, list, tuple, dict)):
            self.size(len(value), what)
        return value

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"rendering took more than {self.seconds:g} s (a loop that does not end?)")

    def trace(self, frame, event, arg):
        """``sys.settrace`` function: trace only the template's compiled code (file ``<template>``),
        and look at the clock every :data:`_LINES_PER_CLOCK_CHECK` of its lines (loops included:
        a jump back to a loop's first line is a line event)."""
        if frame.f_code.co_filename != "<template>":
            return None
        return self._line

    def _line(self, frame, event, arg):
        self._lines -= 1
        if self._lines <= 0:
            self._lines = _LINES_PER_CLOCK_CHECK
            self.clock()
        return self._line


#: The budget of the render in progress (None outside :func:`render_chat`: no limits).
_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _check(value: Any, what: str) -> Any:
    budget = _budget.get()
    return value if budget is None else budget.value(value, what)


def _check_ints(args, kwargs, what: str) -> None:
    """Refuse integer arguments beyond the budget (a width of 10⁹ for ``center``, ``indent``,
    ``'%*d'``): checked before the call, which would build that many characters."""
    budget = _budget.get()
    if budget is None:
        return
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > budget.max_chars:
            raise _OverBudget(f"{what}: the argument {value:,} exceeds the limit of {budget.max_chars:,}")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


def _check_percent(fmt: str, values: tuple) -> None:
    """``fmt % values``: refuse widths and precisions beyond the budget, written in ``fmt``
    (``'%999999999d'``) or, for ``*``, taken from ``values`` (``'%*d' % (10**9, 1)``)."""
    specs = [n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n]
    widths = [int(n) for n in specs if n != "*"]
    if "*" in specs:
        widths += [v for v in values if isinstance(v, int)]
    _check_ints(widths, {}, "% formatting")


def _numbers_in(spec: str) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", spec)]


def _bounded_concat(values) -> str:
    """The ``~`` operator: ``str_join`` with the size checked before the join."""
    parts = [str(v) for v in values]
    budget = _budget.get()
    if budget is not None:
        budget.size(sum(map(len, parts)), "a string built with ~")
    return "".join(parts)


class _CodeGenerator(CodeGenerator):
    """jinja2's code generator, except that ``a ~ b`` calls :func:`_bounded_concat` (the sandbox
    intercepts ``+`` and ``*`` but has no hook for ``~``). Not folded as a constant: the fold would
    run it at compile time, outside any budget."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


#: Filters and ``str`` methods whose integer arguments are widths: the result is at least that long.
_WIDTH_TAKERS = frozenset({"center", "indent", "ljust", "rjust", "zfill", "expandtabs"})


def _bounded_filter(name: str, f):
    """Filter ``f`` with its result checked against the budget (``join``, ``replace``, ``tojson``
    …), and first its width arguments for the filters that pad (:data:`_WIDTH_TAKERS`)."""
    first_argument = 2 if getattr(f, "jinja_pass_arg", None) else 1  # after (context,) value

    @functools.wraps(f)  # copies jinja's pass_context / pass_environment marks too
    def bounded(*args, **kwargs):
        if name in _WIDTH_TAKERS:
            _check_ints(args[first_argument:], kwargs, f"filter {name}")
        elif name == "format" and len(args) >= first_argument and isinstance(args[first_argument - 1], str):
            _check_percent(args[first_argument - 1], tuple(args[first_argument:]))  # '%*d'|format(w, x)
        return _check(f(*args, **kwargs), f"the result of filter {name}")

    return bounded


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, except that touching an unsafe attribute (``x.__class__``) fails at
    once (jinja2's default hands back an Undefined that renders as "", which would hide an escape
    attempt behind a silently wrong prompt), and that the operations that build large values are
    held to the render's budget (see the module docstring)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.bounded_concat = _bounded_concat

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        kind = type(obj).__name__
        raise SecurityError(f"access to attribute {attribute!r} of a {kind!r} object is not allowed")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        """``*``, ``**``, ``+`` and ``%`` with the result's size checked first where it is known."""
        budget = _budget.get()
        if budget is not None:
            sized = (str, list, tuple)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, sized) and isinstance(n, int):
                        budget.size(len(seq) * max(n, 0), "a value built with *")
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                budget.size(len(left) + len(right), "a value built with +")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                digits = right * math.log10(max(abs(left), 1))  # the result's decimal digits
                budget.size(int(digits), "a number built with **")
            elif operator == "%" and isinstance(left, str):
                _check_percent(left, right if isinstance(right, tuple) else (right,))
        return _check(super().call_binop(context, operator, left, right), f"the result of {operator}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        """A call from the template: the padding methods of ``str`` (``'x'.center(n)``,
        :data:`_WIDTH_TAKERS`) get their integer arguments checked first; every result after."""
        if isinstance(__obj, types.BuiltinMethodType) and __obj.__name__ in _WIDTH_TAKERS:
            _check_ints(args, kwargs, f"{__obj.__name__}()")
        return _check(super().call(__context, __obj, *args, **kwargs), "the result of a call")

    def wrap_str_format(self, value: Any):
        """``str.format`` / ``format_map``: widths in the format string and integer arguments are
        checked first (``'{:>999999999}'.format(1)``), the result after."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapped)
        def bounded(*args, **kwargs):
            try:
                specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
            except ValueError:
                specs = []  # the real call reports the malformed format string
            nested = any("{" in spec for spec in specs)  # '{:>{w}}': widths from the arguments
            _check_ints([n for spec in specs for n in _numbers_in(spec)] + (list(args) if nested else []),
                        kwargs if nested else {}, "format()")
            return _check(wrapped(*args, **kwargs), "the result of format()")

        return bounded


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
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    # jinja2 folds constant expressions while compiling ('x'|center(10000000000) runs then): under a
    # budget, a fold that would build too much fails, and jinja2 leaves it to the checked render.
    token = _budget.set(_Budget(RENDER_BASE_CHARS, RENDER_SECONDS))
    try:
        return env.from_string(template)
    finally:
        _budget.reset(token)


def _render(compiled: jinja2.Template, budget: _Budget, variables: dict) -> str:
    """Render under ``budget``: the output is gathered chunk by chunk (``Template.generate``), its
    size and the clock checked after each; the trace function watches the clock in between."""
    token = _budget.set(budget)
    previous = sys.gettrace()
    sys.settrace(budget.trace)  # this thread only; restored below (a debugger's or coverage's tracer)
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            budget.size(size, "the rendered prompt")
            budget.clock()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        sys.settrace(previous)
        _budget.reset(token)


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
            ``raise_exception``, tries an operation the sandbox forbids (unsafe attributes,
            mutating a list), or goes past its budget (too large a value or output, too long a
            render; see the module docstring). The message is one line.
    """
    try:
        compiled = _compile(template)
    except TemplateSyntaxError as e:
        message = f"chat template does not parse: {_one_line(e.message)} (line {e.lineno})"
        raise ChatTemplateError(message) from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not parse: {_one_line(e.message)}") from None
    own = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) + len(bos_token) + len(eos_token)
    budget = _Budget(RENDER_BASE_CHARS + RENDER_INPUT_FACTOR * own, RENDER_SECONDS)
    variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                     eos_token=eos_token)
    try:
        return _render(compiled, budget, variables)
    except _OverBudget as e:
        raise ChatTemplateError(f"chat template stopped: {_one_line(e.message)}") from None
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
