"""A reference model's next-token distributions, and the KL divergence of another run against them.

``mqa-gen perplexity --save-kl-base FILE`` keeps, for every scored position of every chunk
(:mod:`mqa_gen.perplexity_chunks`), the reference model's **top-k** next-token log-probabilities
(k = 32 by default) with their token ids, and the log of the probability left to all other tokens.
A later run on the same text with ``--kl-base FILE`` — another ``--kv-heads``, ``--cache-dtype``
or a converted model — reports how far its distributions moved (llama-perplexity's
``--kl-divergence-base`` / ``--kl-divergence``, which keeps the whole vocabulary at 16 bits):

* **KL divergence** KL(base ‖ model) per position over k + 1 outcomes — the base's top-k tokens,
  and "any other token" as one outcome::

      KL = Σ_{j ∈ top-k} p_j (log p_j − log q_j) + p_rest (log p_rest − log q_rest)

  with p the base's probabilities, q the model's, p_rest = 1 − Σ p_j and q_rest the model's
  probability of every token outside the base's top-k. Lumping the tail into one outcome can only
  lower a KL divergence (the data-processing inequality), so this is a lower bound on the
  full-vocabulary KL, tight when the base puts little mass outside its top-k; for a model against
  its own base it is 0. Reported as the mean over positions ± its standard error.
* **Same top token**: the fraction of positions where the model's most likely token is the base's.

File format (version 1; little-endian; no pickle, nothing executable):

* 8 bytes magic ``b"MQAKLB\\0\\0"``; uint32 format version (1); uint32 header length H;
* H bytes of UTF-8 JSON, the header: ``format`` (``"mqa-gen-kl-base"``), ``version``, ``model``,
  ``n_kv_heads``, ``cache_dtype`` (the reference run, for the reader), ``ctx``, ``n_chunks``,
  ``first``, ``scored_per_chunk``, ``n_positions`` (N = n_chunks × scored_per_chunk), ``top_k``
  (k), ``vocab_size``, ``text_sha256``, ``tokenizer_sha256``, ``tokens_sha256`` (the
  :class:`Fingerprint`), ``digest`` (SHA-256, hex, of the other header fields as canonical JSON —
  sorted keys — and then the four arrays' bytes);
* zero bytes up to a multiple of 8, then four arrays, C order, back to back: ``ids`` int32 [N, k]
  (each row's top-k token ids, most likely first); ``logprob`` float64 [N, k] (their
  log-probabilities, nats; float64 so that a model compared with its own base gives 0, not
  float32's rounding, ~1e-7, which is the size of the KL an f16 cache causes); ``rest_logprob``
  float64 [N] (log of the probability of every other token; −inf when there is none); ``nll``
  float64 [N] (the base's −log p of the token that followed, for its own perplexity).

The reader checks the file against itself before trusting it: a regular file (a FIFO would
block), the magic and version, a header of sane size and types, a total size exactly what the
header's dimensions imply (so nothing is allocated beyond the file), the digest, and then the
values (ids inside the vocabulary, finite log-probabilities ≤ 0). A base made from another text,
tokenizer, ``--ctx`` or chunk count is refused (:func:`check_fingerprint`), since its positions
would not be the run's. Files are written atomically (:mod:`mqa_gen.atomic_file`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

from .atomic_file import atomic_write
from .errors import MqaGenError

FORMAT = "mqa-gen-kl-base"
VERSION = 1
MAGIC = b"MQAKLB\0\0"
#: Top-k kept per position by default.
DEFAULT_TOP_K = 32
#: The largest header a reader accepts (a real one is under 1 KiB).
MAX_HEADER_BYTES = 1 << 20
_PREFIX = struct.Struct("<8sII")  # magic, version, header length


class KLBaseError(MqaGenError):
    """A KL-base file that is missing, unreadable, corrupt, of another format version, or made
    from another text, tokenizer, ``--ctx`` or chunk count (exit code 2)."""


# ───────────────────────────── top-k distributions ─────────────────────────────


@dataclass(frozen=True)
class TopK:
    """Top-k next-token distributions of N scored positions.

    Attributes:
        ids: int32 [N, k] — token ids, most likely first (ties: the lower id first).
        logprob: float64 [N, k] — their log-probabilities (nats).
        rest_logprob: float64 [N] — log of the probability of all other tokens (−inf: none).
        nll: float64 [N] — −log p of the token that followed (nats).
    """

    ids: np.ndarray
    logprob: np.ndarray
    rest_logprob: np.ndarray
    nll: np.ndarray

    @property
    def n_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def rows(self, start: int, stop: int) -> TopK:
        """Positions ``start`` … ``stop − 1`` (views)."""
        return TopK(self.ids[start:stop], self.logprob[start:stop], self.rest_logprob[start:stop],
                    self.nll[start:stop])

    @staticmethod
    def concatenate(parts: list[TopK]) -> TopK:
        """The positions of ``parts``, in order (at least one part)."""
        return TopK(np.concatenate([p.ids for p in parts]), np.concatenate([p.logprob for p in parts]),
                    np.concatenate([p.rest_logprob for p in parts]), np.concatenate([p.nll for p in parts]))


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log Σ exp over each row of float64 [r, n] (−inf for a row of −inf)."""
    top = x.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - safe[:, None]).sum(axis=1)) + safe


def _outside(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log of the probability of every token not in ``ids`` [r, k], per row of ``logp`` [r, vocab]."""
    if ids.shape[1] >= logp.shape[1]:
        return np.full(logp.shape[0], -np.inf)
    masked = logp.copy()
    np.put_along_axis(masked, ids.astype(np.int64), -np.inf, axis=1)
    return _logsumexp_rows(masked)


def top_k_rows(logp: np.ndarray, k: int, nll: np.ndarray) -> TopK:
    """The top-k of float64 log-probabilities ``logp`` [r, vocab] (each row sums to 1 in
    probability), with the targets' ``nll`` [r]. k is capped at the vocabulary size."""
    k = min(k, logp.shape[1])
    idx = np.argpartition(-logp, k - 1, axis=1)[:, :k]  # (r, k), unordered
    vals = np.take_along_axis(logp, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)  # most likely first, ties by the lower id (as argmax)
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    return TopK(idx.astype(np.int32), vals.astype(np.float64), _outside(logp, idx),
                np.asarray(nll, dtype=np.float64).copy())


def compare_rows(base: TopK, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KL(base ‖ model) over the base's top-k plus "the rest" (the module docstring), and whether
    the model's most likely token is the base's, for r positions.

    Args:
        base: the base's distributions at these positions (r rows).
        logp: float64 [r, vocab] — the model's log-probabilities.

    Returns:
        (kl float64 [r] in nats, same_top bool [r]).
    """
    ids = base.ids.astype(np.int64)
    lp = base.logprob.astype(np.float64)  # (r, k)
    lq = np.take_along_axis(logp, ids, axis=1)  # (r, k)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    rest_p = np.exp(base.rest_logprob)
    has_rest = rest_p > 0
    if has_rest.any():
        lq_rest = _outside(logp[has_rest], ids[has_rest])
        kl[has_rest] += rest_p[has_rest] * (base.rest_logprob[has_rest] - lq_rest)
    same = logp.argmax(axis=1) == ids[:, 0]
    return kl, same


# ───────────────────────────── fingerprint ─────────────────────────────


@dataclass(frozen=True)
class Fingerprint:
    """What makes a base's positions the run's: the text, the tokenizer, the chunks.

    Attributes:
        text_sha256: SHA-256 of the text's UTF-8 bytes.
        tokenizer_sha256: SHA-256 of the vocabulary (every token's bytes, BOS and add-BOS).
        tokens_sha256: SHA-256 of the chunks' token ids (int64, BOS substituted).
        vocab_size, ctx, n_chunks: as the run uses them.
    """

    text_sha256: str
    tokenizer_sha256: str
    tokens_sha256: str
    vocab_size: int
    ctx: int
    n_chunks: int


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 (hex) of a tokenizer's vocabulary: each token's bytes (length-prefixed), in id
    order, then the BOS id and whether BOS is added. 0.2 s for Gemma 3's 262,144 tokens."""
    h = hashlib.sha256(b"mqa-gen vocabulary v1\0")
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.token_bytes(i)
        h.update(len(piece).to_bytes(4, "little"))
        h.update(piece)
    h.update(json.dumps([tokenizer.bos_id, bool(tokenizer.add_bos)]).encode())
    return h.hexdigest()


def fingerprint(tokenizer, text: str, plan) -> Fingerprint:
    """The :class:`Fingerprint` of a run on ``text`` cut as ``plan``
    (a :class:`~mqa_gen.perplexity_chunks.ChunkPlan`)."""
    chunks = np.ascontiguousarray(plan.chunks, dtype=np.int64)
    return Fingerprint(
        hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        tokenizer_digest(tokenizer),
        hashlib.sha256(chunks.tobytes()).hexdigest(),
        int(tokenizer.vocab_size), int(plan.ctx), int(plan.n_chunks),
    )


def check_fingerprint(header: dict, fp: Fingerprint, path: str) -> None:
    """Refuse a base (its :func:`read_header` record) whose positions are not this run's.

    Raises:
        KLBaseError: another text, tokenizer, ``--ctx`` or chunk count; one line saying which.
    """
    if header["text_sha256"] != fp.text_sha256:
        raise KLBaseError(f"KL base {path} was made from another text; give the same text file")
    if header["tokenizer_sha256"] != fp.tokenizer_sha256 or header["vocab_size"] != fp.vocab_size:
        raise KLBaseError(f"KL base {path} was made with another tokenizer (model {header.get('model') or '?'}); "
                          "compare models that share a tokenizer")
    if header["ctx"] != fp.ctx:
        raise KLBaseError(f"KL base {path} was made with --ctx {header['ctx']}; this run uses --ctx {fp.ctx}")
    if header["n_chunks"] != fp.n_chunks:
        raise KLBaseError(f"KL base {path} holds {header['n_chunks']} chunks; this run scores {fp.n_chunks} "
                          f"(use --chunks {header['n_chunks']})")
    if header["tokens_sha256"] != fp.tokens_sha256:
        raise KLBaseError(f"KL base {path} was made from other token ids; give the same text and model")


# ───────────────────────────── the file ─────────────────────────────

_ARRAYS = (("ids", np.dtype("<i4"), 2), ("logprob", np.dtype("<f8"), 2), ("rest_logprob", np.dtype("<f8"), 1),
           ("nll", np.dtype("<f8"), 1))

_HEADER_TYPES = {"format": str, "version": int, "model": str, "n_kv_heads": int, "cache_dtype": str, "ctx": int,
                 "n_chunks": int, "first": int, "scored_per_chunk": int, "n_positions": int, "top_k": int,
                 "vocab_size": int, "text_sha256": str, "tokenizer_sha256": str, "tokens_sha256": str,
                 "digest": str}


def _digest(arrays: list[np.ndarray], header: dict) -> str:
    """SHA-256 (hex) of the header's other fields (canonical JSON) and the arrays' bytes."""
    h = hashlib.sha256(b"mqa-gen kl-base v1\0")
    h.update(json.dumps({k: v for k, v in header.items() if k != "digest"}, sort_keys=True).encode("utf-8"))
    for (name, dtype, _), a in zip(_ARRAYS, arrays):
        a = np.ascontiguousarray(a, dtype=dtype)
        h.update(f"{name}:{dtype.str}:{list(a.shape)}\0".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _padded(n: int) -> int:
    return -(-n // 8) * 8


def save_kl_base(path: str | os.PathLike[str], top: TopK, fp: Fingerprint, *, first: int, model: str = "",
                 n_kv_heads: int = 0, cache_dtype: str = "") -> int:
    """Atomically write ``top`` (every scored position of the run ``fp`` describes) to ``path``.

    Returns:
        The file's size in bytes.

    Raises:
        KLBaseError: the file cannot be written (the old one, if any, is left as it was).
    """
    path = os.fspath(path)
    arrays = [np.ascontiguousarray(a, dtype=dtype) for a, (_, dtype, _) in
              zip((top.ids, top.logprob, top.rest_logprob, top.nll), _ARRAYS)]
    n_positions = top.n_positions
    header = {
        "format": FORMAT, "version": VERSION, "model": model, "n_kv_heads": int(n_kv_heads),
        "cache_dtype": str(cache_dtype), "ctx": fp.ctx, "n_chunks": fp.n_chunks, "first": int(first),
        "scored_per_chunk": n_positions // max(fp.n_chunks, 1), "n_positions": n_positions, "top_k": top.k,
        "vocab_size": fp.vocab_size, "text_sha256": fp.text_sha256, "tokenizer_sha256": fp.tokenizer_sha256,
        "tokens_sha256": fp.tokens_sha256,
    }
    header["digest"] = _digest(arrays, header)
    head = json.dumps(header).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, VERSION, len(head)) + head
    prefix += b"\0" * (_padded(len(prefix)) - len(prefix))
    try:
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(prefix)
                for a in arrays:
                    f.write(a.tobytes())
            return os.path.getsize(tmp)
    except OSError as e:
        raise KLBaseError(f"cannot write KL base {path}: {e.strerror or e}") from None


def _open_regular(path: str):
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
    except FileNotFoundError:
        raise KLBaseError(f"KL base {path} does not exist (write one with --save-kl-base {path})") from None
    except OSError as e:
        raise KLBaseError(f"cannot read KL base {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise KLBaseError(f"KL base {path} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_exact(f, n: int, path: str, what: str) -> bytes:
    try:
        data = f.read(n)
    except OSError as e:
        raise KLBaseError(f"cannot read KL base {path}: {e.strerror or e}") from None
    if len(data) != n:
        raise KLBaseError(f"KL base {path} is truncated ({what})")
    return data


def _read_prefix(f, path: str) -> tuple[dict, int]:
    """(checked header, offset of the arrays) of an open file."""
    raw = _read_exact(f, _PREFIX.size, path, "no header")
    magic, version, length = _PREFIX.unpack(raw)
    if magic != MAGIC:
        raise KLBaseError(f"KL base {path} is not a KL-base file (written by mqa-gen perplexity --save-kl-base)")
    if version != VERSION:
        raise KLBaseError(f"KL base {path} has format version {version}; this mqa-gen reads version {VERSION}")
    if length > MAX_HEADER_BYTES:
        raise KLBaseError(f"KL base {path} is corrupt (a header of {length:,} bytes)")
    try:
        header = json.loads(_read_exact(f, length, path, "header").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise KLBaseError(f"KL base {path} is corrupt (unreadable header)")
    for key, kind in _HEADER_TYPES.items():
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise KLBaseError(f"KL base {path} is corrupt (header field {key!r} is missing or invalid)")
    n, k, vocab = header["n_positions"], header["top_k"], header["vocab_size"]
    if (min(n, k, vocab, header["ctx"], header["n_chunks"]) < 1 or k > vocab
            or n != header["n_chunks"] * header["scored_per_chunk"]
            or header["scored_per_chunk"] != header["ctx"] - 1 - header["first"]):
        raise KLBaseError(f"KL base {path} is corrupt (inconsistent dimensions in its header)")
    return header, _padded(_PREFIX.size + length)


def read_header(path: str | os.PathLike[str]) -> dict:
    """The checked header of a KL-base file, without reading its arrays (to fail before a model loads).

    Raises:
        KLBaseError: missing, unreadable, not a KL-base file, another version, or a corrupt header.
    """
    path = os.fspath(path)
    with _open_regular(path) as f:
        return _read_prefix(f, path)[0]


def load_kl_base(path: str | os.PathLike[str], fp: Fingerprint | None = None) -> tuple[TopK, dict]:
    """Read a KL-base file, refusing anything that does not check out (the module docstring).

    Args:
        path: the file.
        fp: the run's fingerprint; the base must match it (None: no check).

    Returns:
        (the :class:`TopK` of every position, the header).

    Raises:
        KLBaseError: one line naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    with _open_regular(path) as f:
        header, offset = _read_prefix(f, path)
        n, k = header["n_positions"], header["top_k"]
        shapes = [(n, k), (n, k), (n,), (n,)]
        # Python ints: a huge count in the header cannot overflow; checked against the file's size
        sizes = [math.prod(s) * dtype.itemsize for s, (_, dtype, _) in zip(shapes, _ARRAYS)]
        size = os.fstat(f.fileno()).st_size
        if size != offset + sum(sizes):
            raise KLBaseError(f"KL base {path} is truncated or corrupt ({size:,} bytes; its header implies "
                              f"{offset + sum(sizes):,})")
        if _read_exact(f, offset - f.tell(), path, "padding").strip(b"\0"):
            raise KLBaseError(f"KL base {path} is corrupt (padding after the header)")
        arrays = [np.frombuffer(_read_exact(f, nbytes, path, name), dtype=dtype).reshape(shape)
                  for nbytes, shape, (name, dtype, _) in zip(sizes, shapes, _ARRAYS)]
    if _digest(arrays, header) != header["digest"]:
        raise KLBaseError(f"KL base {path} is corrupt: its header and arrays do not match the digest "
                          "saved with them")
    if fp is not None:  # after the digest: a damaged header is "corrupt", not "another text"
        check_fingerprint(header, fp, path)
    ids, logprob, rest, nll = arrays
    if ids.min() < 0 or ids.max() >= header["vocab_size"]:
        raise KLBaseError(f"KL base {path} is corrupt: token ids outside the vocabulary")
    if not (np.isfinite(logprob).all() and (logprob <= 0).all() and np.isfinite(nll).all()
            and (nll >= 0).all() and not np.isnan(rest).any() and (rest <= 0).all()):
        raise KLBaseError(f"KL base {path} is corrupt: log-probabilities out of range")
    top = TopK(ids, logprob.astype(np.float64), rest.astype(np.float64), nll.astype(np.float64))
    return top, header
