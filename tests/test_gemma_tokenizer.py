"""The SentencePiece ("llama") tokenizer, on Gemma 3 270M and on made-up vocabularies.

Expected ids come from the oracle (transformers' ``AutoTokenizer`` on the same GGUF), stored by
``scripts/make_fixtures.py --model-name gemma3-270m`` in tests/fixtures/gemma3/tokenizer.json, BOS
included as the file asks (``add_bos_token``). The rest needs no oracle: the file's own metadata,
round trips, the streaming detokenizer against one-shot decoding, and the fast merge derivation
against its plain-loop definition.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from mqa_gen.gguf_file import GGUFFile, read_gguf
from mqa_gen.gguf_tokenizer import SPIECE_SPACE, _sentencepiece_merges, _sentencepiece_merges_reference
from mqa_gen.tokenizer import Tokenizer

from conftest import load_fixture

BYTE_BASE = 238  # Gemma's <0x00> .. <0xFF> are ids 238 .. 493


@pytest.fixture(scope="module")
def gguf(gemma3_path: str) -> GGUFFile:
    return read_gguf(gemma3_path)


@pytest.fixture(scope="module")
def tok(gguf: GGUFFile) -> Tokenizer:
    return Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="module")
def fixture() -> dict:
    data = load_fixture("tokenizer.json", "gemma3")
    assert data["strings"], "fixture has no strings"
    return data


@pytest.fixture(scope="module")
def oracle(fixture: dict) -> list[dict]:
    return fixture["strings"]


# -- the oracle fixture ---------------------------------------------------------------------------


def test_fixture_is_for_this_file(fixture: dict, gemma3_path: str) -> None:
    digest = hashlib.sha256()
    with open(gemma3_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    assert digest.hexdigest() == fixture["model_sha256"]
    assert fixture["bos_added"] and fixture["bos_token_id"] == 2


def test_encode_matches_oracle(tok: Tokenizer, oracle: list[dict]) -> None:
    ours = [tok.encode(e["text"]) for e in oracle]  # BOS added, as the file asks
    wrong = [(e["name"], e["ids"], got) for e, got in zip(oracle, ours) if got != e["ids"]]
    assert not wrong, f"{len(wrong)} of {len(oracle)} strings differ (name, oracle, ours): {wrong}"


def test_oracle_pieces_have_the_oracle_ids(tok: Tokenizer, oracle: list[dict]) -> None:
    for e in oracle:
        assert [tok.token_to_id(p) for p in e["pieces"]] == e["ids"], e["name"]


def test_decode_of_oracle_ids_gives_the_oracle_text(tok: Tokenizer, oracle: list[dict]) -> None:
    wrong = [(e["name"], e["decoded"], tok.decode(e["ids"])) for e in oracle if tok.decode(e["ids"]) != e["decoded"]]
    assert not wrong


def test_round_trip(tok: Tokenizer, oracle: list[dict]) -> None:
    # Lossless except for a literal "▁" in the text, which is the vocabulary's space (the oracle too).
    for e in oracle:
        expected = e["text"].replace(SPIECE_SPACE, " ")
        assert tok.decode(tok.encode(e["text"], add_bos=False)) == expected, e["name"]


def test_streaming_detokenizer_equals_decode(tok: Tokenizer, oracle: list[dict]) -> None:
    for e in oracle:
        for skip in (False, True):
            detok = tok.detokenizer(skip_special=skip)
            out = "".join(detok.add_token(i) for i in e["ids"]) + detok.finalize()
            assert out == detok.text == tok.decode(e["ids"], skip_special=skip), e["name"]


def test_model_fixture_prompts_encode_to_their_ids(tok: Tokenizer) -> None:
    """The prompts of logits.json, greedy.json and perplexity.json (up to 838 tokens) too."""
    for case in load_fixture("logits.json", "gemma3")["prompts"]:
        assert tok.encode(case["text"]) == case["ids"], case["name"]
    for case in load_fixture("greedy.json", "gemma3")["prompts"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"], case["name"]
    ppl = load_fixture("perplexity.json", "gemma3")
    with open(Path(__file__).resolve().parent.parent / ppl["text_file"], encoding="utf-8") as f:
        assert tok.encode(f.read())[: ppl["n_tokens"]] == ppl["ids"]


def test_merges_equal_the_oracles(tok: Tokenizer, fixture: dict) -> None:
    """The BPE merges we derive equal the list transformers derived for this file, element for element."""
    expected = fixture["oracle_merges"]  # make_fixtures.py: merges_digest of the oracle's backend
    merges = json.loads(tok._backend.to_str())["model"]["merges"]
    assert len(merges) == expected["count"]
    assert hashlib.sha256(json.dumps(merges, ensure_ascii=False).encode()).hexdigest() == expected["sha256"]


# -- the real vocabulary --------------------------------------------------------------------------


def test_vocabulary_facts_come_from_the_file(tok: Tokenizer, gguf: GGUFFile) -> None:
    md = gguf.metadata
    assert tok.vocab_size == len(md["tokenizer.ggml.tokens"]) == 262144
    assert (tok.bos_id, tok.eos_id) == (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert tok.add_bos is True
    assert tok.chat_template is None
    for token_id, token_type in enumerate(md["tokenizer.ggml.token_type"]):
        assert tok.is_special(token_id) == (token_type in (3, 4))


def test_token_bytes(tok: Tokenizer) -> None:
    assert tok.token_bytes(tok.token_to_id("\u2581the")) == b" the"
    assert tok.token_bytes(tok.token_to_id("\u2581" * 2)) == b"  "  # stored as "  " (user-defined)
    assert tok.token_bytes(105) == b"<start_of_turn>"
    assert tok.token_bytes(107) == b"\n"
    for b in range(256):
        assert tok.token_to_id(f"<0x{b:02X}>") == BYTE_BASE + b
        assert tok.token_bytes(BYTE_BASE + b) == bytes([b])


def test_turn_markers_are_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n")
    assert ids[:2] == [2, 105] and ids[-2:] == [106, 107]
    assert 105 not in ids[2:] and 106 not in ids[:-2]
    assert tok.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    assert tok.decode(ids, skip_special=True) == "user\nHi\n"


def test_missing_character_falls_back_to_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("x\U00040000y", add_bos=False)  # an unassigned plane-4 code point
    assert ids[1:-1] == [BYTE_BASE + b for b in "\U00040000".encode()]
    assert tok.decode(ids) == "x\U00040000y"


def test_character_split_across_byte_tokens_streams_whole(tok: Tokenizer) -> None:
    robot = "\U0001f916"
    ids = [BYTE_BASE + b for b in robot.encode()]
    detok = tok.detokenizer()
    assert [detok.add_token(i) for i in ids] == ["", "", "", robot]
    assert detok.finalize() == ""


def test_merge_derivation_equals_its_definition_on_gemma(gguf: GGUFFile) -> None:
    tokens = gguf.metadata["tokenizer.ggml.tokens"]
    spelled = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = dict(zip(spelled, range(len(spelled))))
    fast = _sentencepiece_merges(spelled, vocab)
    assert len(fast) == 514906
    assert fast == _sentencepiece_merges_reference(spelled, vocab)


# -- made-up vocabularies -------------------------------------------------------------------------


def spm_gguf(tokens: list[str], types: list[int] | None = None, scores: list[float] | None = None,
             arch: str = "llama", **extra) -> GGUFFile:
    """A made-up SentencePiece vocabulary: <unk>, <s>, </s> (ids 0-2), the 256 byte tokens (3-258),
    then ``tokens``."""
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    all_tokens = head + tokens
    md = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": all_tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + (types or [1] * len(tokens)),
        "tokenizer.ggml.scores": [0.0] * len(head) + (scores or [-float(i) for i in range(len(tokens))]),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": False,
    }
    md.update(extra)
    return GGUFFile("/tiny-spm.gguf", 0, md, {})


def pieces_of(tok: Tokenizer, text: str) -> list[str]:
    return [tok._backend.id_to_token(i) for i in tok.encode(text, add_bos=False)]


def test_merge_order_by_id_for_gemma_by_score_otherwise() -> None:
    # "ab" comes first in the file, "bc" has the better score.
    tokens = ["a", "b", "c", "ab", "bc"]
    scores = [-1.0, -2.0, -3.0, -20.0, -10.0]
    by_id = Tokenizer.from_gguf(spm_gguf(tokens, scores=scores, arch="gemma3"))
    by_score = Tokenizer.from_gguf(spm_gguf(tokens, scores=scores, arch="llama"))
    assert pieces_of(by_id, "abc") == ["ab", "c"]
    assert pieces_of(by_score, "abc") == ["a", "bc"]


def test_space_prefix_and_spaces() -> None:
    tokens = ["  ", "h", "i", "\u2581", "\u2581h", "hi", "\u2581hi", "<ctl>"]  # "  " first, as in Gemma
    types = [4, 1, 1, 1, 1, 1, 1, 3]
    plain = Tokenizer.from_gguf(spm_gguf(tokens, types))
    assert pieces_of(plain, "hi hi") == ["hi", "\u2581hi"]
    assert pieces_of(plain, "hi  hi") == ["hi", "\u2581\u2581", "hi"]  # the user-defined "  ", respelled
    assert plain.decode(plain.encode("hi  hi", add_bos=False)) == "hi  hi"
    assert pieces_of(plain, "<ctl>hi") == ["<ctl>", "hi"]
    prefixed = Tokenizer.from_gguf(spm_gguf(tokens, types, **{"tokenizer.ggml.add_space_prefix": True}))
    assert pieces_of(prefixed, "hi hi") == ["\u2581hi", "\u2581hi"]
    assert pieces_of(prefixed, "<ctl>hi") == ["<ctl>", "hi"]  # only the text's first stretch (transformers)
    absent = {k: v for k, v in spm_gguf(tokens, types).metadata.items() if k != "tokenizer.ggml.add_space_prefix"}
    assert pieces_of(Tokenizer.from_gguf(GGUFFile("/t.gguf", 0, absent, {})), "hi") == ["\u2581hi"]  # llama.cpp default


def test_unknown_character_uses_byte_tokens() -> None:
    tok = Tokenizer.from_gguf(spm_gguf(["h", "i"]))
    assert tok.encode("hé", add_bos=False) == [tok.token_to_id("h"), 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("hé", add_bos=True)) == "<s>hé"


@pytest.mark.parametrize("seed", range(20))
def test_fast_merges_equal_the_definition_on_random_vocabularies(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab\u2581é日"
    tokens = list(alphabet) + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(0, 300))
    ]  # with repeats and empty strings
    vocab = dict(zip(tokens, range(len(tokens))))
    scores = [float(rng.randint(-5, 0)) for _ in tokens]  # many ties
    for s in (None, scores):
        assert _sentencepiece_merges(tokens, vocab, s) == _sentencepiece_merges_reference(tokens, vocab, s)


def test_hash_collisions_cannot_add_a_wrong_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """With base 1 the hash of a text is the sum of its characters' mixed values, so "ba" (not a
    token) hashes like "ab": the character check must drop the cut "ba" + "b" of "bab"."""
    import mqa_gen.gguf_tokenizer as module

    monkeypatch.setattr(module, "_HASH_BASE", 1)
    monkeypatch.setattr(module, "_HASH_BASE_INVERSE", 1)
    tokens = ["a", "b", "ab", "bab"]
    vocab = dict(zip(tokens, range(len(tokens))))
    assert _sentencepiece_merges(tokens, vocab) == [("a", "b"), ("b", "ab")]


def test_colliding_token_hashes_fall_back_to_the_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import mqa_gen.gguf_tokenizer as module

    monkeypatch.setattr(module, "_HASH_BASE", 1)
    monkeypatch.setattr(module, "_HASH_BASE_INVERSE", 1)
    calls = []
    reference = module._sentencepiece_merges_reference
    monkeypatch.setattr(module, "_sentencepiece_merges_reference", lambda *a: calls.append(1) or reference(*a))
    tokens = ["a", "b", "ab", "ba", "aba"]  # "ab" and "ba" hash alike
    vocab = dict(zip(tokens, range(len(tokens))))
    assert _sentencepiece_merges(tokens, vocab) == [("a", "b"), ("b", "a"), ("ab", "a"), ("a", "ba")]
    assert calls


def test_derived_merges_come_back_from_the_repack_cache(gguf: GGUFFile, fixture: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first build derives the merges and gives them to the model's repacked-weight cache; a
    build from the saved file reads them back (a hit, nothing derived) and has the oracle's merges;
    pairs that name an id outside the vocabulary are derived again."""
    import dataclasses

    import mqa_gen.gguf_tokenizer as module
    import mqa_gen.repack_cache as repack_cache

    monkeypatch.setenv("MQA_GEN_REPACK_DIR", str(tmp_path))
    monkeypatch.setattr(repack_cache, "MIN_CACHED_BYTES", 0)  # the merges alone are 4 MB
    first = dataclasses.replace(gguf, repacked=repack_cache.RepackCache.open(gguf))
    Tokenizer.from_gguf(first)
    assert (first.repacked.hits, first.repacked.misses) == (0, 1) and first.repacked.save()

    derived = []
    monkeypatch.setattr(module, "_sentencepiece_merge_ids", lambda *a: derived.append(1) or np.zeros((0, 2), np.int32))
    again = dataclasses.replace(gguf, repacked=repack_cache.RepackCache.open(gguf))
    tok = Tokenizer.from_gguf(again)
    assert (again.repacked.hits, again.repacked.misses, derived) == (1, 0, [])
    merges = json.loads(tok._backend.to_str())["model"]["merges"]
    assert hashlib.sha256(json.dumps(merges, ensure_ascii=False).encode()).hexdigest() == fixture["oracle_merges"]["sha256"]

    store = repack_cache.RepackCache.open(gguf)
    n = len(gguf.metadata["tokenizer.ggml.tokens"])
    bad = np.array([[0, n]], np.int32)
    monkeypatch.setattr(store, "get", lambda *a: (bad,))
    module._merges_via_store(store, ["a"] * n, {}, None)
    assert derived == [1]
