"""Errors that the CLI turns into one line on stderr and an exit code.

Every error a user can cause with bad input derives from :class:`MqaGenError`; the CLI prints
``error: <message>`` and exits with :attr:`MqaGenError.exit_code` (2, click's convention for bad
usage or bad input). Anything else is a bug or a runtime failure and exits with 1.
"""


class MqaGenError(Exception):
    """Base class for errors caused by the user's input. ``exit_code`` is 2."""

    exit_code = 2


class ModelFileError(MqaGenError):
    """A model file that is missing, unreadable, truncated, corrupt or not GGUF."""


class UnsupportedModelError(MqaGenError):
    """A GGUF file whose architecture, tensor type or tensor set this project does not support."""


class ModelNotInstalledError(MqaGenError):
    """A known model name whose package is not installed; the message gives the pip command."""


class ConfigError(MqaGenError):
    """Inconsistent model dimensions (for example n_heads not divisible by n_kv_heads)."""


class PromptError(MqaGenError):
    """An empty prompt, or one longer than the context."""


class SamplingError(MqaGenError):
    """A sampling or generation setting outside its valid range (for example top_p 1.5, a negative
    temperature, max_tokens 0).

    Args:
        field: the setting, as the library names it: a :class:`~mqa_gen.sampling.SamplingParams`
            field (``"temperature"``, ``"top_p"``, …) or a :func:`~mqa_gen.generate.stream_generate`
            argument (``"max_tokens"``, ``"ctx_size"``).
        reason: the rest of the one-line message: the valid range and the value given.

    The message is ``f"{field} {reason}"``; a front end that spells the setting differently (the
    CLI's ``--temp``) builds its own message from ``field`` and ``reason``.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):  # pickle (worker processes) by the two arguments, not the message
        return type(self), (self.field, self.reason)


class SizeError(MqaGenError):
    """A size from a model file, a prompt-cache file or a flag that this machine cannot allocate:
    a KV cache larger than its physical memory and swap (``--ctx-size 2**40``, a model that
    claims a context of two billion tokens)."""


class NumericalError(MqaGenError):
    """The model computed NaN or infinite logits: a damaged model file (garbage or NaN weights) or
    a damaged prompt cache, since finite weights and a finite cache cannot give them."""


class ChatTemplateError(MqaGenError):
    """A chat template that fails to parse or render, or that tries something the sandbox forbids."""
