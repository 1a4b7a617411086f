"""Text <-> token ids for a GGUF model, and a streaming detokenizer.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary under llama.cpp's key names
(format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, "Tokenizer" section):
``tokenizer.ggml.model`` (the algorithm), ``.tokens`` (one string per id), ``.merges`` (BPE pairs
``"a b"`` best first), ``.token_type`` (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED,
6 BYTE), ``.pre`` (the pre-tokenizer's name), special token ids and ``tokenizer.chat_template``.

:meth:`Tokenizer.from_gguf` rebuilds an equivalent Hugging Face ``tokenizers.Tokenizer`` from those
keys; encoding is done entirely by that library (BPE model, pre-tokenizer, added tokens). Decoding
is done here, from a table of the raw bytes each id stands for, so that :meth:`Tokenizer.decode`
and :class:`StreamingDetokenizer` agree byte for byte.

Builders are looked up by ``tokenizer.ggml.model`` in ``_BUILDERS``; only ``"gpt2"`` (byte-level
BPE) exists so far. A SentencePiece ``"llama"`` vocabulary (Gemma 3) adds a builder next to it that
returns the same :class:`_Vocab` (its own BPE/pre-tokenizer setup and a byte table that maps
``"\u2581"`` to a space and ``<0xNN>`` byte tokens to their byte); nothing else needs to change.

Reference behaviour (the test oracle): Hugging Face transformers'
``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` on the same file.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from .errors import ModelFileError, UnsupportedModelError
from .gguf_file import GGUFFile

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 split: contractions, letter runs, digit runs, other-symbol runs (each may take one
# leading space), then whitespace, keeping the last space of a run for the following word.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# ``tokenizer.ggml.pre`` -> the regexes that cut text into words before BPE runs on each word,
# applied in order (each one splits the pieces the previous one left; matches are kept as pieces).
#
# "smollm": llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM) first isolates every single
# \p{N} character, then applies the GPT-2 split; SmolLM2's own tokenizer.json does the same (a
# Digits pre-tokenizer with individual digits). We follow the file, as llama.cpp does, so prompts
# are cut the way the model was trained. transformers' GGUF loader (our oracle elsewhere) has no
# entry for "smollm" and falls back to the plain GPT-2 split; the two differ only in the whitespace
# before a number ("a  5" is [a, ĠĠ, 5] here, [a, Ġ, Ġ, 5] there). The fixture records both.
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),  # llama.cpp's name when the file gives no pre-tokenizer
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
}


@dataclass(frozen=True)
class _Vocab:
    """What a builder returns: the encoder, and for every id the bytes it decodes to."""

    backend: HFTokenizer
    pieces: list[bytes]  # pieces[id] = raw bytes of that token (special tokens: their text, UTF-8)
    types: list[int]  # types[id] = GGUF token type (TOKEN_NORMAL, TOKEN_CONTROL, ...)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: character -> byte.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes are
    shifted to U+0100 and above in byte order (so space 0x20 is 'Ġ', newline 0x0A is 'Ċ').
    Source: OpenAI GPT-2 encoder.py ``bytes_to_unicode``; ``tokenizers.pre_tokenizers.ByteLevel``
    uses the same table.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


def _build_byte_level_bpe(md: dict[str, Any]) -> _Vocab:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): GPT-2, SmolLM, Llama 3, Qwen 2 ...

    Every token is spelled in GPT-2's byte alphabet (see :func:`_byte_level_alphabet`); a token
    spelled with any other character (an added token stored as plain text) is re-spelled byte by
    byte, as transformers does, so BPE and the decoder see one consistent alphabet.
    """
    pre = md.get("tokenizer.ggml.pre", "default")
    splits = _PRE_SPLITS.get(pre)
    if splits is None:
        known = ", ".join(sorted(_PRE_SPLITS))
        raise UnsupportedModelError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: {known})"
        )
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = list(md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFileError(f"tokenizer has {len(tokens)} tokens but {len(types)} token types")
    merges_raw: list[str] = md.get("tokenizer.ggml.merges") or []

    char_to_byte = _byte_level_alphabet()
    byte_to_char = {b: c for c, b in char_to_byte.items()}
    to_bytes = str.maketrans({c: chr(b) for c, b in char_to_byte.items()})
    alphabet = frozenset(char_to_byte)

    vocab: dict[str, int] = {}
    pieces: list[bytes] = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if alphabet.issuperset(tok):
            spelled, raw = tok, tok.translate(to_bytes).encode("latin-1")
        else:
            raw = tok.encode("utf-8")
            spelled = "".join(byte_to_char[b] for b in raw)
            if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                # Also file it under its plain text, the key the added-token matcher looks up;
                # otherwise tokenizers would give the added token a new id past the vocabulary.
                vocab.setdefault(tok, i)
        vocab.setdefault(spelled, i)
        pieces.append(raw)
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if sep:
            merges.append((a, b))

    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()  # we decode from `pieces`; this keeps the backend whole

    # CONTROL tokens (<|im_start|>, <|endoftext|>) and USER_DEFINED ones (<think>) are matched whole
    # in the text, as llama.cpp does; otherwise BPE would cut "<|im_end|>" into pieces. (transformers
    # skips those spelled outside the byte alphabet, e.g. with a plain space; llama.cpp and we match
    # them too. No such token exists in SmolLM2's vocabulary.)
    specials = [
        AddedToken(tok, special=True, normalized=False) for tok, t in zip(tokens, types) if t == TOKEN_CONTROL
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, t in zip(tokens, types)
        if t == TOKEN_USER_DEFINED
    ]
    if specials:
        backend.add_special_tokens(specials)
    if user:
        backend.add_tokens(user)
    for added in (*specials, *user):  # each must keep its own id, not get a new one past the end
        if backend.token_to_id(added.content) >= len(tokens):
            raise UnsupportedModelError(
                f"special token {added.content!r} would get an id past the vocabulary"
            )
    return _Vocab(backend, pieces, types)


# tokenizer.ggml.model -> builder. Add "llama" (SentencePiece BPE, Gemma 3) here.
_BUILDERS: dict[str, Callable[[dict[str, Any]], _Vocab]] = {
    "gpt2": _build_byte_level_bpe,
}


class Tokenizer:
    """A GGUF model's tokenizer.

    Attributes:
        vocab_size: number of ids (``len(tokenizer.ggml.tokens)``).
        bos_id, eos_id: ``tokenizer.ggml.bos_token_id`` / ``eos_token_id``, or None when absent.
        add_bos: ``tokenizer.ggml.add_bos_token`` (False when absent, as llama.cpp does for BPE).
        chat_template: ``tokenizer.chat_template``, or None.
    """

    def __init__(self, vocab: _Vocab, metadata: dict[str, Any]):
        # Internal: use from_gguf. `vocab` comes from a builder in _BUILDERS.
        self._backend = vocab.backend
        self._pieces = vocab.pieces
        self._types = vocab.types
        self.vocab_size: int = len(vocab.pieces)
        self.bos_id: int | None = _opt_id(metadata, "tokenizer.ggml.bos_token_id", self.vocab_size)
        self.eos_id: int | None = _opt_id(metadata, "tokenizer.ggml.eos_token_id", self.vocab_size)
        self.add_bos: bool = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        # Ids that decode(skip_special=True) drops: CONTROL only. USER_DEFINED tokens are real text
        # (llama.cpp prints them; transformers adds them as non-special tokens).
        self._control = frozenset(i for i, t in enumerate(self._types) if t == TOKEN_CONTROL)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build the tokenizer a parsed GGUF file describes.

        Raises:
            UnsupportedModelError: ``tokenizer.ggml.model`` or ``tokenizer.ggml.pre`` is one this
                project cannot build, or the file has no ``tokenizer.ggml.tokens``.
            ModelFileError: the token list and the token-type list differ in length.
        """
        md = gguf.metadata
        model = md.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in md:
            raise UnsupportedModelError(f"GGUF file has no tokenizer (tokenizer.ggml.tokens): {gguf.path}")
        builder = _BUILDERS.get(model)
        if builder is None:
            known = ", ".join(sorted(_BUILDERS))
            raise UnsupportedModelError(
                f"unsupported tokenizer model tokenizer.ggml.model={model!r} (supported: {known})"
            )
        return cls(builder(md), md)

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for ``text``. Special tokens written in the text (``"<|im_start|>"``) become
        their single id. ``add_bos``: prepend BOS; None uses the file's ``add_bos_token``.

        Raises:
            ValueError: BOS is requested but the file defines no BOS token.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
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


def _opt_id(md: dict[str, Any], key: str, vocab_size: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < vocab_size else None
