"""``mqa-gen convert``: regroup a model's KV heads, optionally calibrate K/V, write a GGUF file."""

from __future__ import annotations

import json
import os
import time

import click

from ..calibrate import DEFAULT_CHUNK_TOKENS, DEFAULT_LR, DEFAULT_MAX_TOKENS, DEFAULT_STEPS
from ..errors import PromptError
from .common import ensure_kernels, load_model, mib, model_option, set_threads, stderr, threads_option


def _same_file(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


@click.command()
@model_option
@click.option("--kv-heads", type=int, required=True, help="KV heads of the output: 1 = MQA, n_heads = MHA.")
@click.option("--calibrate", "calibration_text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Fit W_k, W_v on this text (default: mean-pooled only).")
@click.option("--steps", type=click.IntRange(min=0), default=DEFAULT_STEPS, show_default=True,
              help="Adam steps per layer.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LR, show_default=True,
              help="Adam step size.")
@click.option("--calib-tokens", type=click.IntRange(min=2), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Calibration tokens used (the text's first N).")
@click.option("--chunk-tokens", type=click.IntRange(min=2), default=DEFAULT_CHUNK_TOKENS, show_default=True,
              help="Calibration tokens per sequence (the text is cut into equal chunks).")
@click.option("--ppl-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Held-out text for perplexity (default: the shipped English text).")
@click.option("--ppl-tokens", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens of the perplexity window.")
@click.option("--no-eval", is_flag=True, help="Skip the perplexity evaluation.")
@click.option("--kv-type", type=click.Choice(["F32", "F16"]), default="F32", show_default=True,
              help="Stored type of the new K/V matrices.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="GGUF file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@threads_option
def convert(model, kv_heads, calibration_text, steps, lr, calib_tokens, chunk_tokens, ppl_text, ppl_tokens,
            no_eval, kv_type, output, as_json, quiet, threads):
    """Write a copy of a model with KV heads regrouped (1 = MQA), K/V optionally calibrated.

    Without --calibrate, each group's K/V heads are mean-pooled (Ainslie et al. 2023). With it,
    every layer's W_k, W_v start there and are fitted by Adam so that the MQA attention's output
    matches the original's on the text's hidden states. Prints perplexity of the original, the
    mean-pooled and the calibrated model on a held-out text.
    """
    from ..calibrate import calibrate_kv
    from ..convert import mean_pooled_kv, write_regrouped_gguf
    from ..kv_heads import attention_kind, check_kv_heads
    from ..perplexity import DEFAULT_TEXT, perplexity, read_text, window_ids
    from ..regroup import regroup_model

    from ..errors import ModelFileError

    set_threads(threads)
    loaded = load_model(model, quiet)
    if _same_file(loaded.path, output):
        raise ModelFileError(f"the output {output} is the source model; choose another path")
    check_kv_heads(loaded.config.n_heads, loaded.config.n_kv_heads, kv_heads)
    ensure_kernels(quiet)
    c = loaded.config
    say = (lambda text: None) if quiet else (lambda text: stderr.print(text, soft_wrap=True))
    timings: dict[str, float] = {}
    result: dict = {"model": loaded.name, "output": output, "native_kv_heads": c.n_kv_heads, "n_kv_heads": kv_heads,
                    "kv_type": kv_type}

    ppl_ids = None
    if not no_eval:
        ppl_path = ppl_text or str(DEFAULT_TEXT)
        ppl_ids = window_ids(loaded.tokenizer, read_text(ppl_path), ppl_tokens)
        if calibration_text is not None and _same_file(ppl_path, calibration_text):
            say("[yellow]warning: the perplexity text is the calibration text, so it is not held out[/yellow]")
        result["perplexity"] = {"text": ppl_path, "tokens": len(ppl_ids)}
        t = time.perf_counter()
        result["perplexity"]["native"] = perplexity(loaded.model, ppl_ids).perplexity
        result["perplexity"]["mean_pooled"] = perplexity(regroup_model(loaded.model, kv_heads), ppl_ids).perplexity
        timings["eval_seconds"] = time.perf_counter() - t

    if calibration_text is None:
        kv = mean_pooled_kv(loaded.gguf, c, kv_heads)
    else:
        try:
            with open(calibration_text, encoding="utf-8") as f:
                ids = loaded.tokenizer.encode(f.read())
        except (OSError, UnicodeDecodeError) as e:  # a text that is not UTF-8: one line, exit 2
            raise PromptError(f"cannot read calibration text {calibration_text}: "
                              f"{getattr(e, 'strerror', None) or e}") from None

        def progress(fit, seconds):
            say(f"layer {fit.layer + 1:>2}/{c.n_layers}: attention rel. error {fit.before:.4f} → {fit.after:.4f}"
                f"  ({seconds:.0f} s)")

        say(f"calibrating W_k, W_v of {c.n_layers} layers on {calibration_text}: {steps} Adam steps each, lr {lr}")
        cal = calibrate_kv(loaded.model, loaded.gguf, c, kv_heads, ids, steps=steps, lr=lr,
                           chunk_tokens=chunk_tokens, max_tokens=calib_tokens, progress=progress)
        kv = cal.kv_weights
        timings["calibrate_seconds"] = cal.seconds
        result["calibration"] = {"text": calibration_text, "chunks": cal.tokens[0], "chunk_tokens": cal.tokens[1],
                                 "steps": steps, "lr": lr,
                                 "layers": [{"layer": f.layer, "rel_error_mean_pooled": f.before,
                                             "rel_error_calibrated": f.after} for f in cal.fits]}

    t = time.perf_counter()
    size = write_regrouped_gguf(loaded.path, output, c, kv_heads, kv, kv_type)
    timings["write_seconds"] = time.perf_counter() - t
    result["output_bytes"] = size

    if ppl_ids is not None and calibration_text is not None:
        from ..loading import load

        t = time.perf_counter()
        result["perplexity"]["calibrated"] = perplexity(load(output).model, ppl_ids).perplexity
        timings["eval_seconds"] += time.perf_counter() - t
    result["timings"] = timings

    if as_json:
        click.echo(json.dumps(result))
        return
    kind = attention_kind(c.n_heads, kv_heads)
    heads = lambda n: f"{n} KV head{'s' if n != 1 else ''}"  # noqa: E731
    click.echo(f"wrote {output} ({mib(size)}): attn_k/attn_v of {c.n_layers} layers as {kv_type}, "
               f"{heads(c.n_kv_heads)} → {heads(kv_heads)}")
    if ppl_ids is not None:
        p = result["perplexity"]
        held = f"; calibrated on {calibration_text}" if calibration_text is not None else ""
        click.echo(f"perplexity on {p['text']} (first {p['tokens']} tokens{held}):")
        rows = [(f"native {c.attention_kind} ({heads(c.n_kv_heads)})", p["native"]),
                (f"mean-pooled {kind} ({heads(kv_heads)})", p["mean_pooled"])]
        if calibration_text is not None:
            rows.append((f"calibrated {kind} ({heads(kv_heads)})", p["calibrated"]))
        for label, value in rows:
            click.echo(f"  {label:<32} {value:>12,.2f}")
    if "calibrate_seconds" in timings:
        click.echo(f"calibration took {timings['calibrate_seconds']:.0f} s "
                   f"({result['calibration']['chunks']} × {result['calibration']['chunk_tokens']} tokens, "
                   f"{steps} steps per layer)")
