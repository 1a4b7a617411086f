"""ChatSession, the library side of ``mqa-gen chat``: turns on one persistent cache, commits after
an interruption, fitting the context, saving and loading — on the real SmolLM2 model.

The first turn's answer is checked against the transformers oracle (greedy.json: a chat prompt with
the template's default system prompt is exactly a session's first turn)."""

from __future__ import annotations

import os

import pytest

from mqa_gen.chat import render_chat
from mqa_gen.chat_session import ChatSession
from mqa_gen.errors import PromptError
from mqa_gen.prompt_cache import read_prompt_cache_meta, save_prompt_cache
from mqa_gen.sampling import SamplingParams

from conftest import load_fixture

GREEDY = {c["name"]: c for c in load_fixture("greedy.json")["prompts"]}


def session(smollm2, ctx=256, max_tokens=8, **kw) -> ChatSession:
    return ChatSession(smollm2, smollm2.model, ctx, params=SamplingParams(), max_tokens=max_tokens, **kw)


def test_first_turn_is_the_oracle_and_the_second_reuses_it(smollm2):
    case = GREEDY["question"]
    chat = session(smollm2)
    turn = chat.begin(case["prompt"])
    assert turn.dropped == 0
    steps = list(turn.generation)
    chat.commit(turn)
    assert turn.generation.token_ids == case["continuation_ids"][:8]
    assert chat.messages == [{"role": "user", "content": case["prompt"]},
                             {"role": "assistant", "content": "".join(s.text for s in steps)}]
    assert chat.last_finish == "length" and chat.last.prompt_tokens == len(case["prompt_ids"])

    cached = chat.cache.length
    assert cached == len(case["prompt_ids"]) + 8 - 1  # the prompt and the answer but its last token
    second = chat.begin("Thanks!")
    list(second.generation)
    chat.commit(second)
    # The second prompt starts with the whole first turn, so all the cache held is reused and only
    # the rest (the last answer token, the end of turn, the new message) is prefilled.
    tok = smollm2.tokenizer
    prompt = tok.encode(render_chat(tok.chat_template, chat.messages[:3], add_generation_prompt=True))
    assert (chat.last.reused_tokens, chat.last.prompt_tokens) == (cached, len(prompt))
    assert chat.last.prefill_tokens < 20 and len(chat.messages) == 4


def test_an_interrupted_answer_keeps_its_text_or_drops_the_message(smollm2):
    chat = session(smollm2)
    turn = chat.begin("What is the capital of France?")
    for _ in zip(range(3), turn.generation):  # stop after three tokens, as Ctrl-C would
        pass
    chat.commit(turn)
    assert turn.finish_reason == "interrupted" == chat.last_finish
    assert chat.messages[-1] == {"role": "assistant", "content": turn.generation.text} and turn.generation.text
    n = len(chat.messages)

    nothing = chat.begin("And of Italy?")
    chat.commit(nothing)  # stopped before any token: as if the message was never sent
    assert len(chat.messages) == n and nothing.finish_reason == "interrupted"


def test_fit_drops_the_oldest_turns_and_refuses_what_cannot_fit(smollm2):
    chat = session(smollm2, ctx=96, max_tokens=8, system="Answer in one word.")
    alone = len(chat.prompt_ids([{"role": "user", "content": "Name a fruit."}]))
    history = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue " * 80}]
    assert len(chat.prompt_ids(history)) + chat.reserve > 96  # the old turn alone overflows
    kept, ids, dropped = chat.fit(history + [{"role": "user", "content": "Name a fruit."}])
    assert dropped == 1 and kept == [{"role": "user", "content": "Name a fruit."}] and len(ids) == alone
    with pytest.raises(PromptError, match="context is 96 tokens"):
        chat.begin("word " * 200)
    assert chat.messages == [] and chat.cache.length == 0  # nothing changed


def test_save_and_load_restore_the_conversation_and_its_cache(smollm2, tmp_path):
    chat = session(smollm2, system="Be brief.")
    turn = chat.begin("What is the capital of France?")
    list(turn.generation)
    chat.commit(turn)
    path = tmp_path / "talk.cache"
    size = chat.save(str(path))
    assert size == os.path.getsize(path)
    assert read_prompt_cache_meta(path)["length"] == chat.cache.length

    other = session(smollm2)
    assert other.load(str(path)) is True
    assert (other.messages, other.system) == (chat.messages, "Be brief.")
    assert other.cache.token_ids.tolist() == chat.cache.token_ids.tolist()

    bare = tmp_path / "bare.cache"  # a cache without a conversation (as `generate --prompt-cache` writes)
    save_prompt_cache(bare, chat.cache, chat.model_id)
    mine = session(smollm2)
    mine.messages = [{"role": "user", "content": "hi"}]
    assert mine.load(str(bare)) is False
    assert mine.messages == [{"role": "user", "content": "hi"}] and mine.cache.length == chat.cache.length

    chat.reset()
    assert (chat.messages, chat.cache.length, chat.last) == ([], 0, None)
