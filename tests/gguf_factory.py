"""Write tiny but complete llama GGUF files for tests, with ``gguf.GGUFWriter``.

:func:`write_tiny_llama` produces a file that :func:`mqa_gen.loading.load` accepts and that
generates tokens: real llama metadata keys, a byte-level ``gpt2`` tokenizer (the 256 GPT-2 byte
symbols, a few merges, ChatML special tokens, a ChatML chat template) and random weights. Its
knobs make the file wrong in exactly one way (architecture, tensor type, a dropped tensor, head
counts), so each loading error can be provoked on its own.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
# BPE merges (best first) and the tokens they make; spelled in GPT-2's byte alphabet ("Ġ" = space).
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
MERGED_TOKENS = ["Ġt", "he", "Ġthe", "in", "Ġa", "er"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def byte_level_symbols() -> list[str]:
    """GPT-2's 256 byte-level symbols, in byte order (``bytes_to_unicode`` of GPT-2's encoder.py)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(0x100 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def tiny_vocab(vocab_size: int | None = None) -> tuple[list[str], list[int]]:
    """Tokens and token types: specials, 256 byte symbols, merged tokens, then ``<unused_N>``
    padding up to ``vocab_size`` (None: no padding)."""
    tokens = SPECIAL_TOKENS + byte_level_symbols() + MERGED_TOKENS
    types = [TOKEN_CONTROL] * len(SPECIAL_TOKENS) + [TOKEN_NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size must be at least {len(tokens)}, got {vocab_size}")
        extra = vocab_size - len(tokens)
        tokens += [f"<unused_{i}>" for i in range(extra)]
        types += [TOKEN_UNUSED] * extra
    return tokens, types


def _typed(gguf, value: Any) -> tuple:
    """(value, GGUFValueType[, sub_type]) for a plain Python value."""
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return value, T.BOOL
    if isinstance(value, int):
        return value, (T.INT32 if value < 0 else T.UINT32)
    if isinstance(value, float):
        return value, T.FLOAT32
    if isinstance(value, str):
        return value, T.STRING
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value, T.ARRAY, T.STRING
    raise TypeError(f"give {value!r} as a (value, GGUFValueType) tuple")


def _encode_tensor(gguf, weight: np.ndarray, type_name: str):
    """(array to write, raw_dtype or None, float32 values a loader should read back, type used).

    Matrices whose rows do not split into whole blocks of the requested type stay F32, as
    llama.cpp's quantiser falls back for such rows."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if type_name == "F32" or weight.ndim < 2 or weight.shape[-1] % block:
        return weight, None, weight, "F32"
    if type_name in ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        data = gguf.quants.quantize(weight, qtype)
        readback = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(weight.shape)
        return data, (qtype if data.dtype == np.uint8 else None), readback, type_name
    # A type the project does not load (IQ4_NL, TQ1_0 ...): bytes of the right size, no values.
    n_bytes = weight.shape[-1] // block * type_size
    data = np.random.default_rng(0).integers(0, 256, (*weight.shape[:-1], n_bytes), dtype=np.uint8)
    return data, qtype, None, type_name


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    n_heads: int = 4,
    n_kv_heads: int = 1,
    head_dim: int = 8,
    n_layers: int = 2,
    d_ff: int = 24,
    vocab_size: int | None = None,
    context_length: int = 64,
    arch: str = "llama",
    tensor_type: str = "F32",
    drop_tensor: str | None = None,
    rng_seed: int = 0,
    overrides: dict[str, Any] | None = None,
    sliding_window: int = 4,
) -> dict[str, Any]:
    """Write a small llama-architecture GGUF to ``path`` and describe what was written.

    With ``arch="gemma3"`` the file is a tiny Gemma 3 instead: per-layer q/k norms and post-norms,
    ``gemma3.attention.sliding_window`` = ``sliding_window`` and ``key_length`` = head_dim (layer
    5, 11, … global, the others sliding, as Gemma 3's fixed pattern).

    Args:
        n_heads, n_kv_heads, head_dim, n_layers, d_ff: dimensions (d_model = n_heads × head_dim);
            they are written as given, so invalid ones (zero, non-divisible) reach the loader.
        vocab_size: tokens in the vocabulary; None gives the natural 265 (3 specials, 256 bytes,
            6 merged tokens), larger pads with ``<unused_N>`` tokens.
        arch: ``general.architecture`` and the prefix of the ``{arch}.*`` keys.
        tensor_type: ggml type name for the weight matrices (``F32``, ``F16``, ``Q8_0`` … are
            encoded with ``gguf.quants``; a type the project cannot load, e.g. ``IQ4_NL`` or
            ``TQ1_0``, is written as random bytes of the right size). Norms stay F32, as in real
            files; a matrix whose rows are not whole blocks of the type also stays F32.
        drop_tensor: name of a tensor to leave out (e.g. ``"blk.1.ffn_up.weight"``).
        rng_seed: seed of the random weights.
        overrides: metadata to change, full key → value: None leaves the key out; a
            ``(value, gguf.GGUFValueType)`` tuple is written as given (arrays: ``(list,
            ARRAY, sub_type)``); a plain int, float, bool, str or list of str gets the obvious type.

    Returns:
        ``{"path", "metadata"`` (the dimensions), ``"tokens"``, ``"token_types"``, ``"weights"``
        (name → float32 values a loader should read back; None for undecodable types),
        ``"tensor_types"`` (name → ggml type name written)}``.

    Raises:
        ValueError: ``tensor_type`` fits no matrix of these dimensions, or ``vocab_size`` is too small.
    """
    import gguf

    path = os.fspath(path)
    d_model = n_heads * head_dim
    tokens, types = tiny_vocab(vocab_size)
    n_vocab = len(tokens)
    rng = np.random.default_rng(rng_seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        # Scaled like a real init so activations stay O(1) through the layers.
        return (rng.standard_normal((rows, cols)) / np.sqrt(max(cols, 1))).astype(np.float32)

    weights: dict[str, np.ndarray] = {"token_embd.weight": matrix(n_vocab, d_model)}
    for i in range(n_layers):
        p = f"blk.{i}."
        weights[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)
        weights[p + "attn_q.weight"] = matrix(n_heads * head_dim, d_model)
        weights[p + "attn_k.weight"] = matrix(n_kv_heads * head_dim, d_model)
        weights[p + "attn_v.weight"] = matrix(n_kv_heads * head_dim, d_model)
        weights[p + "attn_output.weight"] = matrix(d_model, n_heads * head_dim)
        weights[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)
        weights[p + "ffn_gate.weight"] = matrix(d_ff, d_model)
        weights[p + "ffn_up.weight"] = matrix(d_ff, d_model)
        weights[p + "ffn_down.weight"] = matrix(d_model, d_ff)
        if arch == "gemma3":
            for name, size in (("attn_q_norm", head_dim), ("attn_k_norm", head_dim),
                               ("post_attention_norm", d_model), ("post_ffw_norm", d_model)):
                weights[p + name + ".weight"] = (1 + 0.1 * rng.standard_normal(size)).astype(np.float32)
    weights["output_norm.weight"] = np.ones(d_model, dtype=np.float32)
    # No output.weight: the head is tied to the embeddings, as in SmolLM2.
    if drop_tensor is not None:
        if drop_tensor not in weights:
            raise ValueError(f"no tensor {drop_tensor!r} to drop")
        del weights[drop_tensor]

    T = gguf.GGUFValueType
    kv: dict[str, tuple] = {
        "general.name": (f"tiny-{arch}", T.STRING),
        f"{arch}.block_count": (n_layers, T.UINT32),
        f"{arch}.context_length": (context_length, T.UINT32),
        f"{arch}.embedding_length": (d_model, T.UINT32),
        f"{arch}.feed_forward_length": (d_ff, T.UINT32),
        f"{arch}.attention.head_count": (n_heads, T.UINT32),
        f"{arch}.attention.head_count_kv": (n_kv_heads, T.UINT32),
        f"{arch}.rope.freq_base": (10000.0, T.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.pre": ("smollm", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (MERGES, T.ARRAY, T.STRING),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.ggml.add_bos_token": (False, T.BOOL),
        "tokenizer.chat_template": (CHATML_TEMPLATE, T.STRING),
    }
    if arch == "gemma3":
        kv[f"{arch}.attention.sliding_window"] = (sliding_window, T.UINT32)
        kv[f"{arch}.attention.key_length"] = (head_dim, T.UINT32)
    for key, value in (overrides or {}).items():
        if value is None:
            kv.pop(key, None)
        elif isinstance(value, tuple):
            kv[key] = value
        else:
            kv[key] = _typed(gguf, value)

    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture itself
    for key, (value, vtype, *sub_type) in kv.items():
        writer.add_key_value(key, value, vtype, *sub_type)

    readback: dict[str, np.ndarray | None] = {}
    written_types: dict[str, str] = {}
    for name, w in weights.items():
        data, raw_dtype, values, used = _encode_tensor(gguf, w, tensor_type)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        readback[name], written_types[name] = values, used
    if tensor_type != "F32" and tensor_type not in written_types.values():
        raise ValueError(f"no matrix of these dimensions has rows of whole {tensor_type} blocks")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "path": path,
        "metadata": {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
                     "n_layers": n_layers, "d_ff": d_ff, "d_model": d_model, "vocab_size": n_vocab,
                     "context_length": context_length, "arch": arch},
        "tokens": tokens,
        "token_types": types,
        "weights": readback,
        "tensor_types": written_types,
    }
