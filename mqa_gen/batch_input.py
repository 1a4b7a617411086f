"""The input of ``mqa-gen batch``: prompts one per line, as JSONL or plain text, checked line by line.

JSONL: one object a line with ``prompt`` (text) or ``messages`` (a chat: ``[{"role", "content"}]``)
and, optionally, ``id`` (a string or an integer; default the line number), ``max_tokens``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``stop`` (a string or a list of
them) and ``logprobs`` (alternatives per token). Plain text: each non-blank line is a prompt.
Blank lines are skipped in both; line numbers count every line, from 1, as editors do.

Every line is checked before anything runs, so a bad line is found in seconds rather than after
an hour of generation: it becomes a :class:`BadLine` (``--skip-bad``) or stops the run
(:class:`BatchInputError`, one line naming the line number).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

from .chat import role_problem
from .errors import MqaGenError, SamplingError

#: The fields a JSONL line may carry, beside ``prompt`` or ``messages``.
OPTIONAL_FIELDS = ("id", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "logprobs")


class BatchInputError(MqaGenError):
    """An input line that cannot run (invalid JSON, an unknown field, a bad value, a prompt too
    long), an empty input, or ids used twice. The message names the line."""


@dataclass
class BatchItem:
    """One prompt of the input.

    Attributes:
        line: its line number (from 1). id: its ``id``, or the line number.
        prompt: the text, or None for a chat. messages: the chat, or None for a text prompt.
        settings: the line's own values of :data:`OPTIONAL_FIELDS` (not ``id``), as given.
    """

    line: int
    id: object
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    settings: dict = field(default_factory=dict)


@dataclass
class BadLine:
    """A line that cannot run: its number, the id it gave (or the line number) and why."""

    line: int
    id: object
    message: str


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_settings(settings: dict) -> None:
    """Types and ranges the sampler does not check itself (it checks temperature, top_k, top_p,
    min_p and seed when the request is built)."""
    if "max_tokens" in settings and (not _is_int(settings["max_tokens"])
                                     or (settings["max_tokens"] <= 0 and settings["max_tokens"] != -1)):
        raise SamplingError("max_tokens", f"must be an integer > 0 (or -1: until end of text or a full context), "
                                          f"got {settings['max_tokens']!r}")
    if "logprobs" in settings and (not _is_int(settings["logprobs"]) or not 0 <= settings["logprobs"] <= 20):
        raise SamplingError("logprobs", f"must be an integer in 0..20, got {settings['logprobs']!r}")
    stop = settings.get("stop")
    if stop is not None and not ((isinstance(stop, str) and stop) or (isinstance(stop, list)
                                                                      and all(isinstance(s, str) and s for s in stop))):
        raise SamplingError("stop", "must be a non-empty string or a list of non-empty strings (as --stop)")


def _parse_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                and set(m) <= {"role", "content"}):
            raise ValueError("each message must be an object with a string role and a string content")
        problem = role_problem(m["role"])
        if problem is not None:
            raise ValueError(problem)
    return messages


def parse_jsonl_line(text: str, line: int) -> BatchItem:
    """One JSONL line → a :class:`BatchItem`.

    Raises:
        ValueError, SamplingError: invalid JSON, not an object, an unknown field, neither or both
            of ``prompt`` and ``messages``, or a value of the wrong type or range.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "" if text.lstrip()[:1] in ("{", "[") else "; plain-text prompts, one a line, need --format text"
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno}){hint}") from None
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    item_id = obj.get("id", line)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ValueError("id must be a string or an integer")
    unknown = sorted(set(obj) - set(OPTIONAL_FIELDS) - {"prompt", "messages"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: prompt, messages, {', '.join(OPTIONAL_FIELDS)})")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give exactly one of prompt or messages")
    item = BatchItem(line, item_id, settings={k: v for k, v in obj.items() if k in OPTIONAL_FIELDS and k != "id"})
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError("prompt must be a non-empty string")
        item.prompt = obj["prompt"]
    else:
        item.messages = _parse_messages(obj["messages"])
    _check_settings(item.settings)
    return item


def read_items(lines: Iterable[bytes], text_format: bool) -> list[BatchItem | BadLine]:
    """Parse every line of the input (bytes, as read from a file or stdin).

    Returns one :class:`BatchItem` or :class:`BadLine` per non-blank line, in input order.
    Ids used twice make the second one a :class:`BadLine`.
    """
    out: list[BatchItem | BadLine] = []
    seen: set = set()
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(BadLine(number, number, f"not valid UTF-8 (byte {e.start + 1})"))
            continue
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            item = BatchItem(number, number, prompt=text) if text_format else parse_jsonl_line(text, number)
        except (ValueError, SamplingError) as e:
            out.append(BadLine(number, number, str(e)))
            continue
        key = (type(item.id).__name__, item.id)
        if key in seen:
            out.append(BadLine(number, item.id, f"id {item.id!r} is used by an earlier line"))
            continue
        seen.add(key)
        out.append(item)
    return out
