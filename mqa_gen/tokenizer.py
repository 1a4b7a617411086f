"""Text <-> token ids for a model, and a streaming detokenizer.

Encoding is done by the Hugging Face ``tokenizers`` encoder that :mod:`mqa_gen.gguf_tokenizer`
rebuilds from the GGUF file. Decoding is done here, from the table of the raw bytes each id stands
for, so that :meth:`Tokenizer.decode` and :class:`StreamingDetokenizer` agree byte for byte.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from .errors import PromptError
from .gguf_file import GGUFFile
from .gguf_tokenizer import TOKEN_CONTROL, TOKEN_USER_DEFINED, Vocab, build_vocab


def check_utf8(text: str, what: str = "the text") -> str:
    """``text`` unchanged if it is valid Unicode that UTF-8 can encode; else a PromptError.

    Python hands over bytes that are not UTF-8 as lone surrogates (U+DC80..U+DCFF for byte
    0x80..0xFF): command-line arguments and, in the C locale, stdin are decoded with
    ``surrogateescape``. The tokenizer cannot take them (the ``tokenizers`` library raises
    ``TypeError``), so they are refused here, naming the first bad byte.

    Raises:
        PromptError: ``"{what} is not valid UTF-8 (byte 0xff at character 7)"``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise PromptError(f"{what} is not valid UTF-8 ({byte} at character {e.start + 1})") from None
    return text


def decode_utf8(data: bytes, what: str = "the text") -> str:
    """``data`` decoded as UTF-8 (strict), or a PromptError naming the first bad byte.

    Raises:
        PromptError: ``"{what} is not valid UTF-8 (byte 0xff at byte 1)"``.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start + 1})") from None


class Tokenizer:
    """A GGUF model's tokenizer.

    Attributes (from the :class:`~mqa_gen.gguf_tokenizer.Vocab`):
        vocab_size: number of ids (``len(tokenizer.ggml.tokens)``).
        bos_id, eos_id: ``tokenizer.ggml.bos_token_id`` / ``eos_token_id``, or None when absent.
        add_bos: ``tokenizer.ggml.add_bos_token`` (False when absent, as llama.cpp does for BPE).
        chat_template: ``tokenizer.chat_template``, or None.
    """

    def __init__(self, vocab: Vocab):
        """A tokenizer over ``vocab`` (from :func:`mqa_gen.gguf_tokenizer.build_vocab`; see
        :meth:`from_gguf`)."""
        self._backend = vocab.backend
        self._pieces = vocab.pieces
        self._types = vocab.types
        self.vocab_size: int = len(vocab.pieces)
        self.bos_id: int | None = vocab.bos_id
        self.eos_id: int | None = vocab.eos_id
        self.add_bos: bool = vocab.add_bos
        self.chat_template: str | None = vocab.chat_template
        # Ids that decode(skip_special=True) drops: CONTROL only. USER_DEFINED tokens are real text
        # (llama.cpp prints them; transformers adds them as non-special tokens).
        self._control = frozenset(i for i, t in enumerate(self._types) if t == TOKEN_CONTROL)
        self._max_piece_bytes: int | None = None  # computed on first use (surely_longer_than)

    def surely_longer_than(self, text: str, n_tokens: int) -> bool:
        """True when ``text`` cannot be fewer than ``n_tokens`` tokens, decided without tokenising:
        each token stands for at most the longest piece's bytes, so more UTF-8 bytes than
        ``n_tokens`` × that cannot fit. Lets a huge prompt be refused in microseconds, not after
        tokenising megabytes (seconds and gigabytes)."""
        if self._max_piece_bytes is None:
            self._max_piece_bytes = max(map(len, self._pieces), default=1) or 1
        limit = n_tokens * self._max_piece_bytes
        # characters ≤ bytes: counting characters first spares encoding most long texts
        return len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build the tokenizer a parsed GGUF file describes (:func:`mqa_gen.gguf_tokenizer.build_vocab`).

        Raises:
            UnsupportedModelError: ``tokenizer.ggml.model`` or ``tokenizer.ggml.pre`` is one this
                project cannot build, or the file has no ``tokenizer.ggml.tokens``.
            ModelFileError: the token list and the token-type list (or scores) differ in length.
        """
        return cls(build_vocab(gguf))

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for ``text``. Special tokens written in the text (``"<|im_start|>"``) become
        their single id. ``add_bos``: prepend BOS; None uses the file's ``add_bos_token``.

        Raises:
            ValueError: BOS is requested but the file defines no BOS token.
            PromptError: ``text`` holds lone surrogates (bytes that were not UTF-8; :func:`check_utf8`).
        """
        try:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # the library's answer to lone surrogates (checked only then: no cost)
            if isinstance(text, str):
                check_utf8(text)
            raise
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("a BOS token was requested but the model defines none")
            ids.insert(0, self.bos_id)
        return ids

    def token_to_id(self, token: str) -> int | None:
        """The id of a token as the vocabulary spells it (``"<|im_end|>"``, ``"Ġthe"``), or None."""
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL and USER_DEFINED tokens (the ones matched whole in text)."""
        self._check(token_id)
        return self._types[token_id] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)

    # -- decoding ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes ``token_id`` stands for (byte-level tokens may hold part of a UTF-8
        character; special tokens give their text). Raises ValueError for an id out of range."""
        self._check(token_id)
        return self._pieces[token_id]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``: their bytes joined, then decoded as UTF-8 with each invalid sequence
        replaced by U+FFFD (as ``tokenizers``' ByteLevel decoder and transformers' decode).
        ``skip_special`` drops CONTROL tokens. Raises ValueError for an id out of range."""
        pieces = self._pieces
        n = self.vocab_size
        out = []
        for i in ids:
            if not 0 <= i < n:
                self._check(i)
            if skip_special and i in self._control:
                continue
            out.append(pieces[i])
        return b"".join(out).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        """A fresh :class:`StreamingDetokenizer` for this vocabulary."""
        return StreamingDetokenizer(self, skip_special=skip_special)

    def _check(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range for a vocabulary of {self.vocab_size}")


class StreamingDetokenizer:
    """Turns token ids into text as they are generated, one token at a time.

    :meth:`add_token` returns only text made of whole UTF-8 characters: bytes of a character split
    across tokens (emoji, CJK in a byte-level vocabulary) are held back until the token that
    completes it. The work per token is proportional to that token's bytes (an incremental UTF-8
    decoder over :meth:`Tokenizer.token_bytes`; the history is never re-decoded). The joined
    outputs of every :meth:`add_token` plus :meth:`finalize` equal ``tokenizer.decode(ids)``.
    Idea after mlx-lm's ``StreamingDetokenizer`` (``add_token`` / ``finalize``).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip = tokenizer._control if skip_special else frozenset()
        # Python's incremental UTF-8 decoder keeps an incomplete trailing sequence for the next
        # call and replaces a definitely invalid one at once, exactly as a one-shot decode would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._pending: list[str] = []  # emitted pieces not yet joined into _text (joined lazily)

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text that became printable (possibly ""). Raises ValueError for
        an id out of range."""
        data = self._tokenizer.token_bytes(token_id)
        if token_id in self._skip:
            return ""
        new = self._utf8.decode(data)
        if new:
            self._pending.append(new)
        return new

    def finalize(self) -> str:
        """Flush the bytes still held (an unfinished character becomes U+FFFD) and return them.
        The detokenizer can take more tokens afterwards."""
        new = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if new:
            self._pending.append(new)
        return new

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if self._pending:
            self._text += "".join(self._pending)
            self._pending.clear()
        return self._text
