"""A GGUF file's tokenizer, rebuilt from its metadata: the encoder and the bytes of every token.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary under llama.cpp's key names
(format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, "Tokenizer" section):
``tokenizer.ggml.model`` (the algorithm), ``.tokens`` (one string per id), ``.merges`` (BPE pairs
``"a b"`` best first), ``.token_type`` (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED,
6 BYTE), ``.pre`` (the pre-tokenizer's name), special token ids and ``tokenizer.chat_template``.

:func:`build_vocab` rebuilds an equivalent Hugging Face ``tokenizers.Tokenizer`` from those keys
(encoding is done entirely by that library: BPE model, pre-tokenizer, added tokens) and the table
of the raw bytes each id stands for, from which :class:`mqa_gen.tokenizer.Tokenizer` decodes.

Builders are looked up by ``tokenizer.ggml.model`` in ``_BUILDERS``: ``"gpt2"`` (byte-level BPE:
GPT-2, SmolLM2, Llama 3, Qwen 2) and ``"llama"`` (SentencePiece BPE with byte fallback: Gemma 3,
Llama 2). Both return the same :class:`Vocab`; nothing else depends on the algorithm.

Reference behaviour (the test oracle): Hugging Face transformers'
``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` on the same file.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from .errors import ModelFileError, MqaGenError, UnsupportedModelError
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
class Vocab:
    """Everything :class:`mqa_gen.tokenizer.Tokenizer` needs from a GGUF file's tokenizer keys.

    Attributes:
        backend: the encoder (a ``tokenizers.Tokenizer``; its decoder is set but unused).
        pieces: ``pieces[id]`` = the raw bytes of that token (a byte-level token may hold part of a
            UTF-8 character; special tokens: their text, UTF-8). ``len(pieces)`` is the vocabulary size.
        types: ``types[id]`` = its GGUF token type (:data:`TOKEN_NORMAL`, :data:`TOKEN_CONTROL`, ...).
        bos_id, eos_id: ``tokenizer.ggml.bos_token_id`` / ``eos_token_id``, or None when absent or
            out of range.
        add_bos: ``tokenizer.ggml.add_bos_token`` (False when absent, as llama.cpp does for BPE).
        chat_template: ``tokenizer.chat_template``, or None.
    """

    backend: HFTokenizer
    pieces: list[bytes]
    types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None


def _add_whole_tokens(backend: HFTokenizer, specials: list[AddedToken], user: list[AddedToken], n: int) -> None:
    """Have ``backend`` match ``specials`` (CONTROL tokens, dropped by a skip-special decode) and
    ``user`` (USER_DEFINED ones) whole in the text, each under its own id.

    Raises:
        UnsupportedModelError: one of them is not in the ``n``-token vocabulary, so ``tokenizers``
            would give it a new id past the end.
    """
    if specials:
        backend.add_special_tokens(specials)
    if user:
        backend.add_tokens(user)
    for added in (*specials, *user):
        if backend.token_to_id(added.content) >= n:
            raise UnsupportedModelError(f"special token {added.content!r} would get an id past the vocabulary")


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


def _build_byte_level_bpe(md: dict[str, Any], store: Any = None) -> Vocab:
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
    _add_whole_tokens(backend, specials, user, len(tokens))
    return Vocab(backend, pieces, types)


SPIECE_SPACE = "\u2581"  # SentencePiece's visible space "▁": how its vocabularies spell " "

# Architectures whose SentencePiece merges are ranked by token id rather than by score. transformers'
# GGUF loader does this for Gemma (integrations/gguf/gguf_tokenizer_mapping.py, gemma_tokenizer):
# Gemma files give every CONTROL and USER_DEFINED token the score -1000, so ranking by score would put
# the merge "▁" + "▁" (id 138) behind a thousand ordinary merges; the ids give the order of Gemma's
# own tokenizer.json. (On ordinary Gemma tokens the two orders agree: score = 494 - id.)
_MERGES_BY_ID = frozenset({"gemma", "gemma2", "gemma3"})


def _byte_token_value(token: str) -> bytes | None:
    """``"<0x0A>"`` -> ``b"\\n"``: the byte a SentencePiece byte-fallback token stands for, or None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes.fromhex(token[3:5])
        except ValueError:
            return None
    return None


def _build_sentencepiece_bpe(md: dict[str, Any], store: Any = None) -> Vocab:
    """SentencePiece BPE with byte fallback (``tokenizer.ggml.model == "llama"``): Gemma 3, Llama 2 ...

    Format (llama.cpp's "SPM" vocabulary, which convert_hf_to_gguf.py writes from a SentencePiece
    ``tokenizer.model``): tokens spell a space as U+2581 ``"▁"``; the 256 BYTE tokens ``<0x00>`` ..
    ``<0xFF>`` spell, one UTF-8 byte each, any character the vocabulary lacks (byte fallback);
    ``.scores`` are the SentencePiece piece scores; there is no ``.merges`` list;
    ``.add_space_prefix`` (absent: true, llama.cpp's default) asks for a "▁" before the text.

    The encoder is the one transformers' GGUF loader builds, our oracle
    (integrations/gguf/gguf_tokenizer_mapping.py ``sentencepiece_tokenizer``/``gemma_tokenizer`` and
    models/gemma/tokenization_gemma.py, transformers 5.x):

    - every space becomes "▁" and BPE runs over each whole stretch of text between special tokens
      (no split into words);
    - the merges are every split of every token into two tokens (:func:`_sentencepiece_merges`);
    - a token made only of spaces is spelled with "▁" again: llama.cpp's converter writes
      user-defined tokens with real spaces (Gemma's ``"  "`` .. 31 spaces, ids 138-167; its comment
      "pre-normalize user-defined spaces"), but BPE only ever sees "▁";
    - CONTROL tokens (``<start_of_turn>``, ``<eos>``) and the other USER_DEFINED ones (``"\\n\\n"``,
      ``<table>``, tab runs) are matched whole in the text, as llama.cpp and transformers do;
    - with add_space_prefix, "▁" is put before the text's first stretch only (transformers'
      ``Metaspace(prepend_scheme="first")``; llama.cpp also puts one after each special token), and
      decoding keeps it (``"▁Hello"`` decodes to ``" Hello"``). Gemma files set it false.

    ``pieces``: "▁" -> space, ``<0xNN>`` -> that byte, CONTROL tokens their text as written.

    ``store``: the model's :class:`~mqa_gen.repack_cache.RepackCache` or None; the derived merges
    are kept there (:func:`_merges_via_store`).

    llama.cpp (llama-cpp-python 0.3.36, vocab_only) gives the oracle's ids on all 46 strings of
    tests/fixtures/gemma3/tokenizer.json but two corner cases, where we follow the oracle: a run of
    more than 31 spaces (llama.cpp matches the longest user-defined space token first: 40 spaces are
    31 + 9 there, 16 + 24 by BPE here), and a literal "▁" after a space (llama.cpp ranks merges by
    score, so " ▁c" is "▁" + "▁c" there and "▁▁" + "c" here).
    """
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    n = len(tokens)
    types: list[int] = list(md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n)
    if len(types) != n:
        raise ModelFileError(f"tokenizer has {n} tokens but {len(types)} token types")
    scores = md.get("tokenizer.ggml.scores")
    if scores is not None and len(scores) != n:
        raise ModelFileError(f"tokenizer has {n} tokens but {len(scores)} scores")
    by_id = scores is None or md.get("general.architecture") in _MERGES_BY_ID
    kinds = np.asarray(types, dtype=np.int64)

    spelled = list(tokens)
    for i in [i for i, t in enumerate(tokens) if " " in t]:
        if not tokens[i].strip(" "):
            spelled[i] = SPIECE_SPACE * len(tokens[i])
    vocab = dict(zip(spelled, range(n)))  # a repeated spelling keeps its last id, as in transformers
    merges = _merges_via_store(store, spelled, vocab, None if by_id else scores)
    unk_id = _opt_id(md, "tokenizer.ggml.unknown_token_id", n)
    backend = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=spelled[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    # We decode from `pieces`; this keeps the backend whole (transformers' Gemma decoder).
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )

    # pieces: "▁" -> " " (in bulk: one join, replace, encode and split), then CONTROL tokens as
    # written and BYTE tokens as their byte.
    joined = "\0".join(tokens)
    if joined.count("\0") == n - 1:
        pieces = joined.replace(SPIECE_SPACE, " ").encode("utf-8").split(b"\0") if n else []
    else:  # some token holds a NUL
        pieces = [t.replace(SPIECE_SPACE, " ").encode("utf-8") for t in tokens]
    for i in np.flatnonzero(kinds == TOKEN_CONTROL).tolist():
        pieces[i] = tokens[i].encode("utf-8")
    for i in np.flatnonzero(kinds == TOKEN_BYTE).tolist():
        pieces[i] = _byte_token_value(tokens[i]) or pieces[i]

    specials = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i in np.flatnonzero(kinds == TOKEN_CONTROL).tolist()
        if tokens[i]
    ]
    # A respelled all-space token is left to BPE (transformers does the same; llama.cpp matches it
    # whole, which gives the same ids for runs of up to 31 spaces).
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i in np.flatnonzero(kinds == TOKEN_USER_DEFINED).tolist()
        if tokens[i] and tokens[i] == spelled[i]
    ]
    _add_whole_tokens(backend, specials, user, n)
    return Vocab(backend, pieces, types)


_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_HASH_BASE_INVERSE = pow(_HASH_BASE, -1, 1 << 64)


def _sentencepiece_merges(
    tokens: list[str], vocab: dict[str, int], scores: Sequence[float] | None = None
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first, as (left, right) spellings:
    :func:`_sentencepiece_merge_ids` spelled out."""
    return _spelled_merges(tokens, _sentencepiece_merge_ids(tokens, vocab, scores))


def _spelled_merges(tokens: list[str], pairs: np.ndarray) -> list[tuple[str, str]]:
    """Merge id pairs (int [M, 2]) as (left, right) spellings, ``tokens[i]`` spelling id i."""
    spelling = np.fromiter(tokens, dtype=object, count=len(tokens))
    # Half a million new tuples would set off hundreds of garbage collections that free nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return list(zip(spelling[pairs[:, 0]].tolist(), spelling[pairs[:, 1]].tolist()))
    finally:
        if collecting:
            gc.enable()


def _sentencepiece_merge_ids(
    tokens: list[str], vocab: dict[str, int], scores: Sequence[float] | None = None
) -> np.ndarray:
    """The BPE merges a SentencePiece vocabulary implies, best first: int32 [M, 2], the ids of
    each merge's left and right parts.

    Every way to cut a token into a left and a right part that are both tokens is a merge. They are
    ranked by the token they make: by its id (``scores`` None), or by its score, higher first, ties by
    length of the left part, then of the right part, then id; within one token, the longest left
    part first. That is the rule transformers applies to a GGUF vocabulary that has no merge list
    (``generate_merges`` in tokenization_utils_base.py, given ``-id`` or the scores as the score):
    on Gemma 3's 262,144 tokens both give the same 514,906 merges in the same order.
    ``tokens[i]`` is id i's spelling; ``vocab`` maps a spelling to its id (a repeated spelling
    counts once, under the id ``vocab`` gives it).

    :func:`_sentencepiece_merges_reference` is the plain loop; on Gemma it tests 1.2 million cuts
    against a dict, about 1 s in CPython. Here the lookups are vectorised: each part is hashed (a
    polynomial hash modulo 2**64 of its code points, mixed, read off prefix sums), found among the
    tokens' hashes by one sort and one ordered search, and every hit is then compared character by
    character, so a hash collision can never add a wrong merge; should two tokens' hashes collide
    (a part could then be matched to the wrong one of them), the plain loop runs instead.
    """
    n = len(tokens)
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))  # one id per spelling
    lens = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
    ids = ids[lens[ids] > 0]
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    codes = np.frombuffer("".join(tokens).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)

    # The cuts, in the order wanted: tokens by id (each spelling once), and within a token the cut
    # after character len-1, len-2, ..., 1 (longest left part first).
    ids.sort()
    n_cuts = lens[ids] - 1
    tid = np.repeat(ids, n_cuts)
    m = tid.size
    if m == 0:
        return np.zeros((0, 2), dtype=np.int32)
    first, end = starts[tid], starts[tid + 1]
    group = np.zeros(ids.size, dtype=np.int64)
    np.cumsum(n_cuts[:-1], out=group[1:])
    cut = end - 1 - (np.arange(m) - np.repeat(group, n_cuts))

    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as intended
        x = codes.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # splitmix64's finaliser
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        power = np.full(codes.size + 1, _HASH_BASE, dtype=np.uint64)
        power[0] = 1
        np.cumprod(power, out=power)
        inverse = np.full(codes.size + 1, _HASH_BASE_INVERSE, dtype=np.uint64)
        inverse[0] = 1
        np.cumprod(inverse, out=inverse)
        prefix = np.zeros(codes.size + 1, dtype=np.uint64)
        np.cumsum(x * power[:-1], out=prefix[1:])

        def span_hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # hash of characters [a, b)
            return (prefix[b] - prefix[a]) * inverse[a]

        # The tokens' hashes, sorted, low bits cleared: while the cuts are sorted, those bits carry
        # each cut's index, so that finding all of them is one sort and one ordered search.
        low = np.uint64((1 << m.bit_length()) - 1)
        table = span_hash(starts[ids], starts[ids + 1]) & ~low
        order = np.argsort(table)
        table, table_ids = table[order], ids[order]
        if np.any(table[1:] == table[:-1]):
            reference = _sentencepiece_merges_reference(tokens, vocab, scores)
            return np.array([(vocab[a], vocab[b]) for a, b in reference], dtype=np.int32).reshape(-1, 2)

        def lookup(h: np.ndarray) -> np.ndarray:  # the id of the token whose hash is h, else -1
            packed = np.sort((h & ~low) | np.arange(h.size, dtype=np.uint64))
            key = packed & ~low
            at = np.minimum(np.searchsorted(table, key), table.size - 1)
            found = table[at] == key
            result = np.full(h.size, -1, dtype=np.int64)
            result[(packed[found] & low).astype(np.int64)] = table_ids[at[found]]
            return result

        left = lookup(span_hash(first, cut))
        hit = np.flatnonzero(left >= 0)  # look up right parts only where the left part is a token
        tid, first, cut, end, left = tid[hit], first[hit], cut[hit], end[hit], left[hit]
        right = lookup(span_hash(cut, end))

    # Check every hit exactly: the lengths, then left + right against the token, character by character.
    k = cut - first
    hit = np.flatnonzero(right >= 0)
    hit = hit[(lens[left[hit]] == k[hit]) & (lens[right[hit]] == (end - cut)[hit])]
    tid, first, k, left, right = tid[hit], first[hit], k[hit], left[hit], right[hit]
    good = _same_text(codes, starts[left], first, k) & _same_text(codes, starts[right], first + k, lens[right])
    tid, k, left, right = tid[good], k[good], left[good], right[good]

    if scores is not None:
        rank = np.lexsort((tid, -(lens[tid] - k), -k, -np.asarray(scores, dtype=np.float64)[tid]))
        left, right = left[rank], right[rank]
    return np.stack([left, right], axis=1).astype(np.int32)


#: The store entry of the derived merges, and its kind: the digest of this file, so a change to
#: the merge rule (or anything here) derives them again instead of reading stale ones.
_MERGES_ENTRY = "tokenizer.derived_merges"
_MERGES_KIND = "merge-ids-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _merges_via_store(store: Any, tokens: list[str], vocab: dict[str, int],
                      scores: Sequence[float] | None) -> list[tuple[str, str]]:
    """:func:`_sentencepiece_merges`, with the id pairs kept in ``store`` (the model file's
    :class:`~mqa_gen.repack_cache.RepackCache`, which is keyed by the file's fingerprint), or
    derived every time when ``store`` is None. Deriving Gemma 3's 514,906 merges takes 0.3–0.7 s of
    its start, on the path to the first token; reading them back and spelling them out ~0.1 s. Pairs
    read back that name an id outside the vocabulary are derived again."""
    n = len(tokens)
    pairs = None
    if store is not None:
        got = store.get(_MERGES_ENTRY, _MERGES_KIND, (n,))
        if got is not None and got[0].ndim == 2 and got[0].shape[1] == 2 and (
                got[0].size == 0 or (0 <= got[0].min() and got[0].max() < n)):
            pairs = got[0]
    if pairs is None:
        pairs = _sentencepiece_merge_ids(tokens, vocab, scores)
        if store is not None:
            store.put(_MERGES_ENTRY, _MERGES_KIND, (n,), (pairs,))
    return _spelled_merges(tokens, pairs)


def _same_text(codes: np.ndarray, a: np.ndarray, b: np.ndarray, length: np.ndarray) -> np.ndarray:
    """For each i: ``codes[a[i] : a[i] + length[i]] == codes[b[i] : b[i] + length[i]]`` (length >= 1)."""
    if length.size == 0:
        return np.zeros(0, dtype=bool)
    offset = np.zeros(length.size, dtype=np.int64)
    np.cumsum(length[:-1], out=offset[1:])
    at = np.arange(int(offset[-1] + length[-1])) + np.repeat(a - offset, length)  # a[i] + 0, 1, ...
    differs = codes[at] != codes[at + np.repeat(b - a, length)]
    return ~np.logical_or.reduceat(differs, offset)


def _sentencepiece_merges_reference(
    tokens: list[str], vocab: dict[str, int], scores: Sequence[float] | None = None
) -> list[tuple[str, str]]:
    """:func:`_sentencepiece_merges` as a plain loop (the definition; slow on a large vocabulary)."""
    found = [
        (t[:k], t[k:], i)
        for t, i in vocab.items()
        for k in range(len(t) - 1, 0, -1)
        if t[:k] in vocab and t[k:] in vocab
    ]
    if scores is None:
        found.sort(key=lambda f: f[2])  # stable: within a token, longest left part first
    else:
        found.sort(key=lambda f: (-scores[f[2]], -len(f[0]), -len(f[1]), f[2]))
    return [(a, b) for a, b, _ in found]


# tokenizer.ggml.model -> builder.
_BUILDERS: dict[str, Callable[[dict[str, Any], Any], Vocab]] = {
    "gpt2": _build_byte_level_bpe,
    "llama": _build_sentencepiece_bpe,
}


def build_vocab(gguf: GGUFFile) -> Vocab:
    """The :class:`Vocab` a parsed GGUF file's tokenizer keys describe.

    Raises:
        UnsupportedModelError: ``tokenizer.ggml.model`` or ``tokenizer.ggml.pre`` is one this
            project cannot build, or the file has no ``tokenizer.ggml.tokens``.
        ModelFileError: the token list and the token-type list (or scores) differ in length, or
            any other tokenizer metadata the builders or the ``tokenizers`` library reject (a
            merge naming a token that is not in the vocabulary, a token list of numbers, …).
    """
    try:
        return _build_vocab(gguf)
    except MqaGenError:
        raise
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises bare Exception; damaged values raise anything
        lines = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ModelFileError(f"invalid tokenizer metadata in {gguf.path}: {detail}") from None


def _build_vocab(gguf: GGUFFile) -> Vocab:
    """:func:`build_vocab` without the mapping of unexpected failures to ModelFileError."""
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
    template = md.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFileError(f"tokenizer.chat_template in {gguf.path} is not text")
    vocab = builder(md, gguf.repacked)
    n = len(vocab.pieces)
    bos_id = _opt_id(md, "tokenizer.ggml.bos_token_id", n)
    add_bos = md.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise ModelFileError(f"tokenizer.ggml.add_bos_token in {gguf.path} is not true or false: {add_bos!r:.40}")
    if add_bos and bos_id is None:  # every prompt would need a token the vocabulary lacks
        raise ModelFileError(f"tokenizer.ggml.add_bos_token is set in {gguf.path} but it has no valid "
                             "tokenizer.ggml.bos_token_id")
    return dataclasses.replace(
        vocab,
        bos_id=bos_id,
        eos_id=_opt_id(md, "tokenizer.ggml.eos_token_id", n),
        add_bos=add_bos,
        chat_template=template,
    )


def _opt_id(md: dict[str, Any], key: str, vocab_size: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < vocab_size else None
