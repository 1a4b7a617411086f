"""llama-perplexity's chunked method (mqa_gen.perplexity_chunks) and KL bases (mqa_gen.kl_base).

Oracles: the transformers fixture (tests/fixtures/*/perplexity.json: every token's nll over one
window from BOS or the text's start), which equals our first chunk's scored tokens because a causal
model's logits at position i see only tokens 0..i; a plain NumPy computation from each chunk's full
logits (one forward pass, not our pieces); and a direct full-vocabulary KL for the top-k KL.
"""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen import kl_base as klb
from mqa_gen.perplexity import PerplexityError
from mqa_gen.perplexity_chunks import (
    EVAL_TEXT,
    ChunkPlan,
    chunked_perplexity,
    plan_chunks,
    plan_text,
    score_chunk,
)

from conftest import load_fixture

# ───────────────────────────── chunking ─────────────────────────────


def test_chunks_are_cut_as_llama_perplexity_cuts_them():
    ids = list(range(100, 111))  # 11 tokens
    plan = plan_chunks(ids, 4)
    assert plan.chunks.tolist() == [[100, 101, 102, 103], [104, 105, 106, 107]]  # the tail is dropped
    assert (plan.first, plan.scored_per_chunk, plan.n_scored, plan.available) == (2, 1, 2, 2)
    assert plan.targets().tolist() == [[103], [107]]
    with_bos = plan_chunks([7] + ids, 4, bos_id=7)  # BOS in front of the text, and over every chunk's first token
    assert with_bos.chunks.tolist() == [[7, 100, 101, 102], [7, 104, 105, 106], [7, 108, 109, 110]]
    assert plan_chunks(ids, 4, n_chunks=1).n_chunks == 1
    assert plan_chunks(ids, 4, n_chunks=99).n_chunks == 2  # as llama-perplexity: min(--chunks, available)
    assert plan_chunks(ids, 4, n_chunks=-1).n_chunks == 2
    assert plan_chunks(list(range(512)), 256).scored_per_chunk == 127
    assert plan_chunks(list(range(1024)), 512).scored_per_chunk == 255  # llama-perplexity's n_ctx - 1 - n_ctx/2


@pytest.mark.parametrize("args,fragments", [
    ((list(range(7)), 4), ("has 7 tokens", "needs at least 8")),
    ((list(range(10)), 2), ("at least 3",)),
    ((list(range(10)), 4, 0), ("--chunks",)),
    ((list(range(10)), 4, -2), ("--chunks",)),
])
def test_bad_plans_are_refused(args, fragments):
    with pytest.raises(PerplexityError) as e:
        plan_chunks(*args)
    for fragment in fragments:
        assert fragment in str(e.value)


# ───────────────────────────── against the transformers oracle ─────────────────────────────


@pytest.mark.parametrize("model,ctx", [("smollm2", 424), ("gemma3", 128)])
def test_first_chunk_equals_the_oracle_window(model, ctx, request):
    """Chunk 0 is the oracle's window cut at ctx (Gemma: BOS first in both), so its scored nll are
    the oracle's token_nll[ctx/2 : ctx-1]; later chunks start from an empty cache, which the
    oracle's single window does not, so they have no oracle here."""
    loaded = request.getfixturevalue(model)
    fx = load_fixture("perplexity.json", model)
    text = _fixture_text(fx)
    plan = plan_text(loaded.tokenizer, text, ctx)
    assert plan.chunks[0].tolist() == fx["ids"][:ctx]
    score = score_chunk(loaded.model, plan.chunks[0], plan.first, "float32")
    oracle = np.array(fx["token_nll"][plan.first : ctx - 1])
    np.testing.assert_allclose(score.nll, oracle, atol=2e-4)
    assert np.exp(score.nll.mean()) == pytest.approx(np.exp(oracle.mean()), rel=2e-5)


def _fixture_text(fx) -> str:
    from conftest import REPO

    return (REPO / fx["text_file"]).read_text(encoding="utf-8")


# ───────────────────────────── against plain NumPy ─────────────────────────────


def _numpy_reference(model, plan: ChunkPlan):
    """Each chunk through one forward pass from a fresh cache, all logits at once; the statistics
    written out directly (not through the module's helpers)."""
    per_chunk = []
    for chunk in plan.chunks:
        logits = model.forward(chunk, model.new_cache(plan.ctx), all_logits=True).astype(np.float64)
        rows = logits[plan.first : plan.ctx - 1]
        logz = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
        per_chunk.append(logz - rows[np.arange(rows.shape[0]), chunk[plan.first + 1 :]])
    nll = np.concatenate(per_chunk)
    running = [np.exp(np.concatenate(per_chunk[: i + 1]).mean()) for i in range(len(per_chunk))]
    ppl = np.exp(nll.mean())
    return ppl, ppl * np.sqrt(nll.var() / (nll.size - 1)), running, nll


def test_chunked_perplexity_equals_numpy_from_full_logits(smollm2):
    plan = plan_text(smollm2.tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), 96, 3)
    got = chunked_perplexity(smollm2.model, plan)
    ppl, se, running, nll = _numpy_reference(smollm2.model, plan)
    np.testing.assert_allclose(got.token_nll.reshape(-1), nll, atol=1e-4)
    assert got.perplexity == pytest.approx(ppl, rel=1e-5)
    assert got.stderr == pytest.approx(se, rel=1e-4)
    np.testing.assert_allclose(got.running, running, rtol=1e-5)
    assert got.running[-1] == pytest.approx(got.perplexity, rel=1e-12)


def test_gemma_puts_bos_first_in_every_chunk(gemma3):
    plan = plan_text(gemma3.tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), 48, 2)
    assert gemma3.tokenizer.add_bos and (plan.chunks[:, 0] == gemma3.tokenizer.bos_id).all()
    got = chunked_perplexity(gemma3.model, plan)
    ppl, se, _, _ = _numpy_reference(gemma3.model, plan)
    assert got.perplexity == pytest.approx(ppl, rel=1e-5) and got.stderr == pytest.approx(se, rel=1e-4)


# ───────────────────────────── top-k KL ─────────────────────────────


def _random_logp(rng, rows, vocab, scale=3.0):
    x = rng.standard_normal((rows, vocab)) * scale
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def test_top_k_keeps_the_most_likely_tokens_and_the_rest_mass():
    rng = np.random.default_rng(0)
    logp = _random_logp(rng, 5, 50)
    top = klb.top_k_rows(logp, 8, np.zeros(5))
    for r in range(5):
        order = np.argsort(-logp[r], kind="stable")[:8]
        assert top.ids[r].tolist() == order.tolist()
        np.testing.assert_array_equal(top.logprob[r], logp[r, order])
        rest = np.delete(np.exp(logp[r]), order).sum()
        assert top.rest_logprob[r] == pytest.approx(np.log(rest), rel=1e-12)


def test_kl_with_the_whole_vocabulary_is_the_full_kl_and_top_k_is_a_lower_bound():
    rng = np.random.default_rng(1)
    p, q = _random_logp(rng, 6, 40), _random_logp(rng, 6, 40)
    full = (np.exp(p) * (p - q)).sum(1)  # KL(p || q), directly
    kl_all, same = klb.compare_rows(klb.top_k_rows(p, 40, np.zeros(6)), q)
    np.testing.assert_allclose(kl_all, full, rtol=1e-9)
    kl_top, _ = klb.compare_rows(klb.top_k_rows(p, 5, np.zeros(6)), q)
    assert (kl_top <= full + 1e-9).all() and (kl_top > 0).all()
    assert same.tolist() == (p.argmax(1) == q.argmax(1)).tolist()
    self_kl, self_same = klb.compare_rows(klb.top_k_rows(p, 5, np.zeros(6)), p)
    assert np.abs(self_kl).max() < 1e-12 and self_same.all()


# ───────────────────────────── the file ─────────────────────────────


def _small_base(rng, n=6, k=4, vocab=30):
    logp = _random_logp(rng, n, vocab)
    return klb.top_k_rows(logp, k, rng.random(n) * 3)


def _fp(**change):
    fields = dict(text_sha256="a" * 64, tokenizer_sha256="b" * 64, tokens_sha256="c" * 64, vocab_size=30, ctx=7,
                  n_chunks=2)
    fields.update(change)
    return klb.Fingerprint(**fields)


def test_kl_base_file_round_trip(tmp_path):
    top = _small_base(np.random.default_rng(2))
    path = tmp_path / "base.klb"
    size = klb.save_kl_base(path, top, _fp(), first=3, model="m", n_kv_heads=3, cache_dtype="float32")
    assert size == path.stat().st_size
    back, header = klb.load_kl_base(path, _fp())
    for name in ("ids", "logprob", "rest_logprob", "nll"):
        np.testing.assert_array_equal(getattr(back, name), getattr(top, name))
    assert (header["ctx"], header["n_chunks"], header["top_k"], header["model"]) == (7, 2, 4, "m")
    assert klb.read_header(path)["n_positions"] == 6
    assert [p.name for p in tmp_path.iterdir()] == ["base.klb"]  # no temporary file left behind


@pytest.mark.parametrize("change,fragment", [
    (dict(ctx=9), "--ctx 7; this run uses --ctx 9"),
    (dict(n_chunks=3), "use --chunks 2"),
    (dict(text_sha256="d" * 64), "another text"),
    (dict(tokenizer_sha256="d" * 64), "another tokenizer"),
    (dict(vocab_size=31), "another tokenizer"),
    (dict(tokens_sha256="d" * 64), "other token ids"),
])
def test_a_base_of_another_run_is_refused(tmp_path, change, fragment):
    path = tmp_path / "base.klb"
    klb.save_kl_base(path, _small_base(np.random.default_rng(3)), _fp(), first=3)
    with pytest.raises(klb.KLBaseError) as e:
        klb.load_kl_base(path, _fp(**change))
    assert fragment in str(e.value)


def test_damaged_bases_are_refused(tmp_path):
    path = tmp_path / "base.klb"
    klb.save_kl_base(path, _small_base(np.random.default_rng(4)), _fp(), first=3)
    good = path.read_bytes()
    cases = {
        "flipped": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
        "truncated": good[:-8],
        "longer": good + b"\0" * 8,
        "not ours": b"PK\x03\x04" + good[4:],
        "empty": b"",
        "huge header": klb.MAGIC + (1).to_bytes(4, "little") + (2**30).to_bytes(4, "little"),
        "version 2": klb.MAGIC + (2).to_bytes(4, "little") + good[12:],
    }
    expected = {"flipped": "digest", "truncated": "truncated", "longer": "truncated", "not ours": "not a KL-base file",
                "empty": "truncated", "huge header": "corrupt", "version 2": "format version 2"}
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(klb.KLBaseError) as e:
            klb.load_kl_base(path, _fp())
        assert expected[name] in str(e.value), (name, str(e.value))
    with pytest.raises(klb.KLBaseError, match="does not exist"):
        klb.load_kl_base(tmp_path / "missing.klb")
    with pytest.raises(klb.KLBaseError, match="not a regular file"):
        klb.read_header(tmp_path)


def test_every_flipped_bit_is_refused(tmp_path):
    """Each byte of a small base with one bit flipped (the lowest, and a letter's case bit): the
    magic, the header (parsing, types, or the digest that covers it), the padding or the arrays."""
    path = tmp_path / "base.klb"
    klb.save_kl_base(path, _small_base(np.random.default_rng(5)), _fp(), first=3, model="m", cache_dtype="float32")
    good = path.read_bytes()
    for i in range(len(good)):
        for bit in (0, 5):
            damaged = bytearray(good)
            damaged[i] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(klb.KLBaseError):
                klb.load_kl_base(path, _fp())
