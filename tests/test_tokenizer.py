"""Tokenizer and streaming detokenizer.

Expected ids come from the oracle (transformers loading the same GGUF), stored by
scripts/make_fixtures.py in tests/fixtures/smollm2/tokenizer.json. Everything else is checked
against properties that need no oracle: UTF-8 bytes of known characters, round trips, and the
streaming output always being a prefix of the one-shot decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqa_gen.errors import UnsupportedModelError
from mqa_gen.gguf_file import GGUFFile, read_gguf
from mqa_gen.registry import resolve_model
from mqa_gen.tokenizer import StreamingDetokenizer, Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2" / "tokenizer.json"


@pytest.fixture(scope="module")
def gguf() -> GGUFFile:
    return read_gguf(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tok(gguf: GGUFFile) -> Tokenizer:
    return Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="module")
def oracle() -> list[dict]:
    # Missing fixture is a failure, not a skip: CI always has it.
    with open(FIXTURE, encoding="utf-8") as f:
        strings = json.load(f)["strings"]
    assert strings, "fixture has no strings"
    return strings


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte alphabet as published (encoder.py bytes_to_unicode): byte b -> character.
    Printable Latin-1 bytes stand for themselves; the rest move to U+0100.. in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte of ``data``."""
    chars = gpt2_byte_chars()
    ids = [tok.token_to_id(chars[b]) for b in data]
    assert None not in ids
    return ids


# -- the oracle fixture ---------------------------------------------------------------------------


def expected_ids(e: dict) -> list[int]:
    """The ids the file's own pre-tokenizer gives: the oracle's, except where the fixture records
    ``native_ids`` (transformers ignores the "smollm" digit split; see mqa_gen/gguf_tokenizer.py)."""
    return e.get("native_ids", e["ids"])


def test_encode_matches_oracle(tok: Tokenizer, oracle: list[dict]) -> None:
    ours = [tok.encode(e["text"]) for e in oracle]
    wrong = [(e["text"], expected_ids(e), got) for e, got in zip(oracle, ours) if got != expected_ids(e)]
    assert not wrong, f"{len(wrong)} of {len(oracle)} strings differ (text, oracle, ours): {wrong}"


def test_decode_of_oracle_ids_gives_text_back(tok: Tokenizer, oracle: list[dict]) -> None:
    wrong = [(e["decoded"], tok.decode(e["ids"])) for e in oracle if tok.decode(e["ids"]) != e["decoded"]]
    assert not wrong


def test_oracle_pieces_have_the_oracle_ids(tok: Tokenizer, oracle: list[dict]) -> None:
    for e in oracle:
        if "pieces" in e:
            assert [tok.token_to_id(p) for p in e["pieces"]] == e["ids"], e["text"]


def test_streaming_oracle_ids_rebuilds_text(tok: Tokenizer, oracle: list[dict]) -> None:
    for e in oracle:
        detok = tok.detokenizer()
        out = "".join(detok.add_token(i) for i in e["ids"]) + detok.finalize()
        assert out == e["decoded"] == detok.text


# -- the real vocabulary --------------------------------------------------------------------------


def test_vocabulary_facts_come_from_the_file(tok: Tokenizer, gguf: GGUFFile) -> None:
    md = gguf.metadata
    assert tok.vocab_size == len(md["tokenizer.ggml.tokens"])
    assert tok.bos_id == md["tokenizer.ggml.bos_token_id"]
    assert tok.eos_id == md["tokenizer.ggml.eos_token_id"]
    assert tok.chat_template == md["tokenizer.chat_template"]
    for token_id, token_type in enumerate(md["tokenizer.ggml.token_type"]):
        assert tok.is_special(token_id) == (token_type in (3, 4))


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert start not in ids[1:-1] and end not in ids[1:-1]
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nHi"


def test_add_bos(tok: Tokenizer, gguf: GGUFFile) -> None:
    plain = tok.encode("Hi", add_bos=False)
    assert tok.encode("Hi", add_bos=True) == [tok.bos_id, *plain]
    default_adds = gguf.metadata.get("tokenizer.ggml.add_bos_token", False)
    assert tok.encode("Hi") == ([tok.bos_id, *plain] if default_adds else plain)


def test_single_byte_tokens_stand_for_their_byte(tok: Tokenizer) -> None:
    chars = gpt2_byte_chars()
    present = {b: tok.token_to_id(chars[b]) for b in range(256) if tok.token_to_id(chars[b]) is not None}
    assert all(tok.token_bytes(i) == bytes([b]) for b, i in present.items())
    # SmolLM2 lacks a few control bytes and bytes that never or almost never occur in UTF-8 text;
    # everything text needs for the BMP and the emoji planes is there.
    needed = {0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0x80, 0xC0), *range(0xC2, 0xF1)}
    assert needed <= present.keys()


def test_token_bytes_of_known_tokens(tok: Tokenizer) -> None:
    assert tok.token_bytes(tok.token_to_id("Ġthe")) == b" the"
    assert tok.token_bytes(tok.token_to_id("Ċ")) == b"\n"
    assert tok.token_bytes(tok.token_to_id("<|im_end|>")) == b"<|im_end|>"


def test_bad_ids_raise(tok: Tokenizer) -> None:
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError):
            tok.token_bytes(bad)
        with pytest.raises(ValueError):
            tok.decode([bad])
        with pytest.raises(ValueError):
            tok.detokenizer().add_token(bad)
    assert tok.token_to_id("no such token here") is None


@pytest.mark.parametrize(
    "text",
    [
        "", " ", "Hello  world", "\n\n", "a\tb\r\n", "café cafe\u0301", "日本語", "👨\u200d👩\u200d👧",
        "x = 3.14159", "<|im_start|>assistant\n", "< |im_start|>", "<|im_start", "Ġ literal Ċ",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


# -- streaming detokenizer ------------------------------------------------------------------------


def stream(detok: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add_token(i) for i in ids]


def test_emoji_split_into_byte_tokens_is_emitted_whole_once(tok: Tokenizer) -> None:
    robot = "\U0001f916"  # 4 UTF-8 bytes: F0 9F A4 96
    ids = byte_ids(tok, robot.encode())
    detok = tok.detokenizer()
    assert stream(detok, ids) == ["", "", "", robot]
    assert detok.finalize() == ""
    assert detok.text == robot


def test_text_before_a_split_character_is_not_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("ok ") + byte_ids(tok, "日".encode()) + tok.encode("!")
    detok = tok.detokenizer()
    out = stream(detok, ids)
    assert "".join(out[:-4]) == "ok "
    assert out[-4:] == ["", "", "日", "!"]


def test_finalize_flushes_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("a") + byte_ids(tok, "€".encode()[:2])
    detok = tok.detokenizer()
    assert "".join(stream(detok, ids)) == "a"
    assert detok.finalize() == "\ufffd"
    assert detok.text == tok.decode(ids) == "a\ufffd"


def test_invalid_byte_is_replaced_when_known_invalid(tok: Tokenizer) -> None:
    ids = byte_ids(tok, b"\x80") + tok.encode("a")
    detok = tok.detokenizer()
    assert stream(detok, ids) == ["\ufffd", "a"]
    assert tok.decode(ids) == "\ufffda"


def test_skip_special_while_streaming(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>Hi<|im_end|>")
    detok = tok.detokenizer(skip_special=True)
    assert "".join(stream(detok, ids)) + detok.finalize() == tok.decode(ids, skip_special=True) == "Hi"


def test_streaming_never_decodes_the_history(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode("Hello there, 世界 👨\u200d👩\u200d👧 " * 20)
    expected = tok.decode(ids)

    def forbidden(*args, **kwargs):
        raise AssertionError("the streaming detokenizer must work on token bytes, not re-decode")

    monkeypatch.setattr(tok, "decode", forbidden)
    detok = tok.detokenizer()
    assert "".join(stream(detok, ids)) + detok.finalize() == expected


def token_sequences(tok: Tokenizer) -> st.SearchStrategy[list[int]]:
    """Random ids mixing: any id, single-byte tokens (lone lead/continuation bytes), the byte
    tokens of multi-byte characters whole or cut short, and special tokens."""
    chars = gpt2_byte_chars()
    special = [i for i in range(tok.vocab_size) if tok.is_special(i)]
    byte_token = st.sampled_from([i for i in map(tok.token_to_id, chars) if i is not None])
    multibyte = ["é", "日", "€", "\u200d", "👍", "👨", "𝄞"]  # 2, 3 and 4 UTF-8 bytes
    split_char = st.sampled_from([[tok.token_to_id(chars[b]) for b in c.encode()] for c in multibyte])
    one = st.one_of(
        st.integers(0, tok.vocab_size - 1).map(lambda i: [i]),
        byte_token.map(lambda i: [i]),
        split_char,
        split_char.map(lambda ids: ids[:-1]),  # a character cut short
        st.sampled_from(special).map(lambda i: [i]),
    )
    return st.lists(one, max_size=25).map(lambda parts: [i for part in parts for i in part])


def test_streaming_equals_decode_property(tok: Tokenizer) -> None:
    @settings(max_examples=400, deadline=None)
    @given(token_sequences(tok))
    def check(ids: list[int]) -> None:
        full = tok.decode(ids)
        detok = tok.detokenizer()
        emitted = ""
        for k, token_id in enumerate(ids, 1):
            emitted += detok.add_token(token_id)
            # Never emit anything the full decode does not have at that point (so no U+FFFD that
            # the full decode lacks), and hold back nothing once the bytes so far are valid UTF-8.
            assert full.startswith(emitted)
            try:
                so_far = b"".join(tok.token_bytes(i) for i in ids[:k]).decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                assert emitted == so_far
        emitted += detok.finalize()
        assert emitted == full == detok.text

    check()


# -- building from other vocabularies -------------------------------------------------------------


def tiny_gguf(**overrides) -> GGUFFile:
    """A made-up byte-level vocabulary: 256 byte tokens, ' the' by merges, a control token and a
    user-defined token written in plain text (with a real space)."""
    chars = gpt2_byte_chars()
    tokens = [*chars, "Ġt", "he", "Ġthe", "<|eot|>", "my token"]
    types = [1] * 259 + [3, 4]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.eos_token_id": 259,
    }
    md.update(overrides)
    md = {k: v for k, v in md.items() if v is not None}
    return GGUFFile("/tiny.gguf", 0, md, {})


def test_tiny_vocabulary() -> None:
    tok = Tokenizer.from_gguf(tiny_gguf())
    assert tok.encode(" the") == [258]
    assert tok.bos_id is None and tok.eos_id == 259
    ids = tok.encode("a my token<|eot|>")
    assert ids[-2:] == [260, 259]
    assert tok.token_bytes(260) == b"my token"
    assert tok.is_special(259) and tok.is_special(260) and not tok.is_special(258)
    # USER_DEFINED tokens are text: only CONTROL ones are dropped by skip_special.
    assert tok.decode(ids, skip_special=True) == "a my token"
    assert tok.decode(ids) == "a my token<|eot|>"
    with pytest.raises(ValueError, match="BOS"):
        tok.encode("x", add_bos=True)


def test_unknown_tokenizer_model_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="wordpiece-x"):
        Tokenizer.from_gguf(tiny_gguf(**{"tokenizer.ggml.model": "wordpiece-x"}))


def test_unknown_pre_tokenizer_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="my-new-pre"):
        Tokenizer.from_gguf(tiny_gguf(**{"tokenizer.ggml.pre": "my-new-pre"}))


def test_missing_vocabulary_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(tiny_gguf(**{"tokenizer.ggml.tokens": None}))
