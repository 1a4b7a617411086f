"""Chat template rendering and end-of-turn ids.

Expected prompts come from the oracle (transformers' apply_chat_template on the same GGUF), stored
by scripts/make_fixtures.py in tests/fixtures/smollm2/chat.json and greedy.json.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from mqa_gen.chat import end_of_turn_ids, render_chat
from mqa_gen.errors import ChatTemplateError, MqaGenError
from mqa_gen.gguf_file import GGUFFile, read_gguf
from mqa_gen.registry import resolve_model
from mqa_gen.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct")))


def load(name: str):
    with open(FIXTURES / name, encoding="utf-8") as f:
        return json.load(f)


def special_text(tok: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tok.decode([token_id])


# -- against the oracle ---------------------------------------------------------------------------


def test_smollm2_template_matches_oracle(tok: Tokenizer) -> None:
    cases = load("chat.json")
    assert cases
    for case in cases:
        got = render_chat(
            tok.chat_template,
            case["messages"],
            add_generation_prompt=case["add_generation_prompt"],
            bos_token=special_text(tok, tok.bos_id),
            eos_token=special_text(tok, tok.eos_id),
        )
        assert got == case["rendered"], case["name"]


def test_rendered_chat_prompt_encodes_to_oracle_ids(tok: Tokenizer) -> None:
    chats = [p for p in load("greedy.json")["prompts"] if p["mode"] == "chat"]
    assert chats
    for p in chats:
        text = render_chat(tok.chat_template, [{"role": "user", "content": p["prompt"]}])
        assert text == p["rendered"]
        assert tok.encode(text) == p["prompt_ids"], p["name"]


def test_end_of_turn_ids_for_chatml(tok: Tokenizer) -> None:
    ids = end_of_turn_ids(tok)
    assert tok.eos_id in ids
    assert tok.token_to_id("<|im_end|>") in ids
    assert tok.token_to_id("<|im_start|>") not in ids
    assert all(tok.is_special(i) for i in ids)


def test_end_of_turn_ids_ignore_plain_tokens_spelled_alike() -> None:
    # A Gemma-like vocabulary: <end_of_turn> is a control token; "<|im_end|>" is ordinary text.
    tokens = ["<pad>", "<eos>", "<end_of_turn>", "<|im_end|>", "a"]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 1, 1],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 1,
    }
    tok = Tokenizer.from_gguf(GGUFFile("/tiny.gguf", 0, md, {}))
    assert end_of_turn_ids(tok) == {1, 2}


# -- the environment transformers gives templates -------------------------------------------------

USER = [{"role": "user", "content": "Hi <b> & 'you'"}]


def test_trim_and_lstrip_blocks() -> None:
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "[{{ m.content }}]\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    assert render_chat(template, USER) == "[Hi <b> & 'you']\n"


def test_generation_prompt_and_special_token_variables() -> None:
    template = (
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    assert render_chat(template, USER, bos_token="<s>", eos_token="</s>") == "<s>Hi <b> & 'you'</s>>"
    assert render_chat(template, USER, add_generation_prompt=False) == "Hi <b> & 'you'"


def test_tojson_does_not_html_escape() -> None:
    assert render_chat("{{ messages[0].content | tojson }}", USER) == json.dumps(USER[0]["content"])


def test_strftime_now() -> None:
    year = datetime.now().strftime("%Y")
    assert render_chat('{{ strftime_now("%Y") }}', USER) == year


def test_loop_controls() -> None:
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    assert render_chat(template, USER * 3) == "user"


# -- errors ---------------------------------------------------------------------------------------


def assert_one_line_error(template: str, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_chat(template, USER)
    assert isinstance(info.value, MqaGenError)
    assert "\n" not in str(info.value)


def test_raise_exception_becomes_chat_template_error() -> None:
    template = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    assert_one_line_error(template, "Only user and assistant roles")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
    ],
)
def test_unsafe_attribute_access_is_refused(template: str) -> None:
    assert_one_line_error(template, "unsafe")


def test_mutating_a_list_is_refused() -> None:
    assert_one_line_error("{% set xs = [1] %}{{ xs.append(2) }}{{ xs }}", "unsafe")


def test_syntax_error_is_one_line_with_line_number() -> None:
    assert_one_line_error("ok\n{% for m in messages %}{{ m.content }}", r"does not parse: .*\(line \d+\)")


def test_runtime_error_is_one_line() -> None:
    assert_one_line_error("{{ messages[0].content.nonexistent() }}", "failed")
    assert_one_line_error("{{ 1 / 0 }}", "ZeroDivisionError")
