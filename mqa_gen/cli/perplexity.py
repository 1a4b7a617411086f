"""``mqa-gen perplexity FILE``: llama-perplexity's chunked perplexity, and KL against a saved base.

A thin layer over :mod:`mqa_gen.perplexity_chunks` (the method) and :mod:`mqa_gen.kl_base` (the
reference distributions and their file). stderr: what is scored, the running value per chunk
(``[1]12.3456,[2]…``) and the time; stdout: ``Final estimate: PPL = x +/- y`` (with ``--kl-base``
also the KL divergence, the top-token agreement and the base's PPL), or one JSON object with
``--json``.
"""

from __future__ import annotations

import json
import os
import sys

import click

from ..errors import MqaGenError
from .common import MAX_PROMPT_BYTES, generation_option, model_option, read_limited, threads_option


def read_eval_text(path: str) -> str:
    """The text of FILE (``-`` = stdin), UTF-8, at most :data:`~mqa_gen.cli.common.MAX_PROMPT_BYTES`.

    Raises:
        PerplexityError: missing, unreadable, not a regular file or stdin, too long, not UTF-8.
    """
    from ..perplexity import PerplexityError

    try:
        if path == "-":
            data = read_limited(sys.stdin.buffer, MAX_PROMPT_BYTES, "the text on stdin")
        else:
            with open(path, "rb") as f:
                data = read_limited(f, MAX_PROMPT_BYTES, f"text file {path}")
    except MqaGenError as e:
        raise PerplexityError(str(e)) from None
    except OSError as e:
        raise PerplexityError(f"cannot read text file {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PerplexityError(f"text file {path} is not UTF-8 (byte {e.start:,})") from None


def _check_output_path(path: str) -> None:
    """Refuse a ``--save-kl-base`` path that cannot be written, before minutes of scoring."""
    from ..kl_base import MAGIC, KLBaseError
    from .common import output_path_problem

    problem = output_path_problem(path, MAGIC, "KL-base")
    if problem is not None:
        raise KLBaseError(f"--save-kl-base {path}: {problem}")


def _nats(x: float) -> str:
    """A KL divergence: six decimals, or three significant digits when it is below 0.001 (f16 against
    f32 is ~1e-7: "0.000000" would hide it)."""
    return f"{x:.6f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def _echo(text: str, quiet: bool, nl: bool = True) -> None:
    if not quiet:
        click.echo(text, err=True, nl=nl)
        sys.stderr.flush()


@click.command("perplexity")
@click.argument("file", metavar="FILE")
@model_option
@click.option("-c", "--ctx", "--ctx-size", "ctx", type=int, default=512, show_default=True,
              help="Tokens per chunk; each chunk is scored on the tokens after its first half.")
@click.option("--chunks", type=int, default=-1, show_default=True,
              help="Score only the first N chunks; -1 = all the text holds.")
@generation_option("kv_heads")
@generation_option("cache_dtype")
@generation_option("int8_dot")
@click.option("--save-kl-base", "save_base", default=None, metavar="OUT",
              help="Write this model's top-k next-token distributions at every scored position to OUT, "
                   "for later runs to compare against with --kl-base.")
@click.option("--kl-base", "kl_base", default=None, metavar="BASE",
              help="Compare against BASE (from --save-kl-base on the same text, --ctx and --chunks): "
                   "mean KL divergence and how often the top token agrees.")
@click.option("--kl-top-k", type=click.IntRange(min=1), default=None, metavar="K",
              help="Distributions kept per position by --save-kl-base: the top K (default 32), plus "
                   "the probability of all other tokens together.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
@threads_option
def perplexity(file, model, ctx, chunks, kv_heads, cache_dtype, int8_dot, save_base, kl_base, kl_top_k, as_json, quiet,
               threads):
    """Perplexity of a model on the text in FILE (- = stdin), by llama-perplexity's method: the text
    cut into chunks of --ctx tokens, each run from an empty KV cache and scored on its second half.
    Prints the running value per chunk on stderr and `Final estimate: PPL = x +/- y` (the standard
    error) on stdout."""
    from .. import kl_base as klb
    from ..kv_storage import storage_type
    from ..perplexity import PerplexityError
    from ..perplexity_chunks import MIN_CTX, chunked_perplexity, plan_text
    from ..regroup import regroup_model
    from . import common

    # Everything that can be checked without the model, first.
    if save_base is not None and kl_base is not None:
        raise klb.KLBaseError("give --save-kl-base (write a base) or --kl-base (compare with one), not both")
    if kl_top_k is not None and save_base is None:
        raise klb.KLBaseError("--kl-top-k sets what --save-kl-base keeps; give --save-kl-base too")
    if ctx < MIN_CTX:
        raise PerplexityError(f"--ctx must be at least {MIN_CTX} (a chunk scores the tokens after its first half), "
                              f"got {ctx}")
    if chunks == 0 or chunks < -1:
        raise PerplexityError(f"--chunks must be at least 1 (-1 = all), got {chunks}")
    text = read_eval_text(file)
    if not text:
        raise PerplexityError("stdin is empty" if file == "-" else f"text file {file} is empty")
    if kl_base is not None:
        klb.read_header(kl_base)  # a missing or foreign file fails before the model loads
    if save_base is not None:
        _check_output_path(save_base)

    common.set_threads(threads)
    loaded = common.load_model(model, quiet)
    trained = loaded.config.context_length
    if ctx > trained:
        raise PerplexityError(f"--ctx {ctx:,} is above the model's context of {trained:,} tokens")
    net = loaded.model if kv_heads is None else regroup_model(loaded.model, kv_heads)
    common.set_int8_dot(net, int8_dot, quiet)
    common.check_cache_dtype(cache_dtype, net.config.head_dim)
    common.ensure_kernels(quiet)
    tokenizer = loaded.tokenizer
    plan = plan_text(tokenizer, text, ctx, chunks)
    fp = klb.fingerprint(tokenizer, text, plan) if (save_base or kl_base) else None
    base = None
    if kl_base is not None:
        base, base_header = klb.load_kl_base(kl_base, fp)
    top_k = (kl_top_k or klb.DEFAULT_TOP_K) if save_base is not None else 0
    dtype_name = storage_type(cache_dtype).name

    label = "stdin" if file == "-" else os.path.basename(file)
    _echo(f"perplexity: {plan.n_chunks} chunk{'s' if plan.n_chunks != 1 else ''} of {ctx:,} tokens from {label} "
          f"({plan.n_text_tokens:,} tokens{', BOS first in each chunk' if tokenizer.add_bos else ''}), each scored "
          f"on its last {plan.scored_per_chunk:,} ({plan.n_scored:,} in all); {loaded.name}, "
          f"{net.config.n_kv_heads} KV head{'s' if net.config.n_kv_heads != 1 else ''}, {dtype_name} cache"
          f"{', int8 dot products' if int8_dot else ''}", quiet)
    result = chunked_perplexity(net, plan, cache_dtype, top_k=top_k, base=base,
                                on_chunk=lambda i, ppl: _echo(f"[{i}]{ppl:.4f},", quiet, nl=False))
    _echo("", quiet)
    _echo(f"scored in {result.seconds:.1f} s ({result.seconds / plan.n_chunks:.2f} s per chunk)", quiet)

    saved = None
    if save_base is not None:
        size = klb.save_kl_base(save_base, result.top, fp, first=plan.first, model=loaded.name,
                                n_kv_heads=net.config.n_kv_heads, cache_dtype=dtype_name)
        saved = {"path": save_base, "top_k": result.top.k, "positions": result.top.n_positions, "bytes": size}
        _echo(f"KL base written to {save_base}: top-{result.top.k} of {result.top.n_positions:,} positions, "
              f"{size / 2**10:,.0f} KiB", quiet)

    if as_json:
        out = {
            "model": loaded.name, "text": file, "text_tokens": plan.n_text_tokens, "ctx": ctx,
            "chunks": plan.n_chunks, "chunks_available": plan.available, "first_scored": plan.first,
            "scored_per_chunk": plan.scored_per_chunk, "scored_tokens": plan.n_scored,
            "add_bos": bool(tokenizer.add_bos), "kv_heads": net.config.n_kv_heads, "cache_dtype": dtype_name,
            "int8_dot": int8_dot, "perplexity": result.perplexity, "perplexity_stderr": result.stderr, "mean_nll": result.mean_nll,
            "running_perplexity": result.running, "seconds": result.seconds, "kl": None, "saved_kl_base": saved,
        }
        if result.kl is not None:
            k = result.kl
            out["kl"] = {"base": kl_base, "base_model": base_header["model"],
                         "base_kv_heads": base_header["n_kv_heads"], "base_cache_dtype": base_header["cache_dtype"],
                         "top_k": k.top_k, "mean_kl": k.mean_kl, "mean_kl_stderr": k.kl_stderr,
                         "same_top_percent": 100 * k.same_top, "same_top_percent_stderr": 100 * k.same_top_stderr,
                         "base_perplexity": k.base_perplexity, "base_perplexity_stderr": k.base_stderr}
        click.echo(json.dumps(out))
        return
    click.echo(f"Final estimate: PPL = {result.perplexity:.4f} +/- {result.stderr:.5f}")
    if result.kl is not None:
        k = result.kl
        click.echo(f"KL divergence from {kl_base} (top-{k.top_k} + rest): mean {_nats(k.mean_kl)} +/- "
                   f"{_nats(k.kl_stderr)} nats")
        click.echo(f"Same top token: {100 * k.same_top:.3f} +/- {100 * k.same_top_stderr:.3f} %")
        heads = base_header["n_kv_heads"]
        click.echo(f"Base estimate: PPL = {k.base_perplexity:.4f} +/- {k.base_stderr:.5f} "
                   f"({base_header['model']}, {heads} KV head{'s' if heads != 1 else ''}, "
                   f"{base_header['cache_dtype']} cache)")
