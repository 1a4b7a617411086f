"""``mqa-gen convert``: merge a model's KV heads, optionally fit each layer, write a GGUF file."""

from __future__ import annotations

import json
import time

import click

from ..calibrate import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_FIT_WEIGHTS,
    DEFAULT_INPUTS,
    DEFAULT_LR,
    DEFAULT_MAX_TOKENS,
    DEFAULT_METHOD,
    DEFAULT_MINIBATCH,
    DEFAULT_STEPS,
    INPUTS,
)
from ..head_merge import METHODS
from .common import (OptionError, ensure_kernels, load_model, mib, model_option, output_path_problem, same_file,
                     set_threads, stderr, threads_option)

_WEIGHT_LETTERS = {"q": "w_q", "k": "w_k", "v": "w_v", "o": "w_o"}

#: Progress lines per layer during the fit (step, loss).
_STEP_REPORTS = 4


def _fit_weights(ctx, param, value: str) -> tuple[str, ...]:
    """``"qkvo"`` (letters, any order; commas allowed) → ("w_q", "w_k", "w_v", "w_o")."""
    letters = [ch for ch in value.replace(",", "").lower() if not ch.isspace()]
    bad = [ch for ch in letters if ch not in _WEIGHT_LETTERS]
    if bad or not letters or len(set(letters)) != len(letters):
        raise click.BadParameter(f"{value!r}: give some of the letters q, k, v, o once each (e.g. qkvo, kv)")
    return tuple(_WEIGHT_LETTERS[ch] for ch in "qkvo" if ch in letters)


@click.command()
@model_option
@click.option("--kv-heads", type=int, required=True, help="KV heads of the output: 1 = MQA, n_heads = MHA.")
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
              help="How each group of KV heads is merged: mean-pooled, Procrustes-aligned then merged, "
                   "rank-head_dim SVD of the weights, or of their outputs on the calibration text (pca).")
@click.option("--fit/--no-fit", default=True, show_default=True,
              help="After the merge, fit each layer's projections to the original layer's output.")
@click.option("--calibrate", "calibration_text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text for aligned/pca and the fit (default: the shipped "
                   "mqa_gen/data/calibration_english.txt, after the conversations of "
                   "calibration_chat.jsonl in the model's chat template).")
@click.option("--fit-weights", default="qkvo", show_default=True, callback=_fit_weights,
              help="Projections the fit changes: letters of q, k, v, o.")
@click.option("--inputs", type=click.Choice(INPUTS), default=DEFAULT_INPUTS, show_default=True,
              help="Fit each layer on the hidden states the converted layers below it produce, to "
                   "bring the residual stream back to the original's (converted), or on the original "
                   "model's states, to the original attention's output (native).")
@click.option("--steps", type=click.IntRange(min=0), default=DEFAULT_STEPS, show_default=True,
              help="Adam steps per layer.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LR, show_default=True,
              help="Adam step size.")
@click.option("--minibatch", type=click.IntRange(min=0), default=DEFAULT_MINIBATCH, show_default=True,
              help="Calibration chunks per Adam step, drawn at random (0: all of them every step).")
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
              help="Stored type of the new matrices.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="GGUF file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@threads_option
def convert(model, kv_heads, method, fit, calibration_text, fit_weights, inputs, steps, lr, minibatch, calib_tokens,
            chunk_tokens, ppl_text, ppl_tokens, no_eval, kv_type, output, as_json, quiet, threads):
    """Write a copy of a model with KV heads regrouped (1 = MQA), merged by --method and fitted.

    Each group of KV heads is merged into one (--method: mean-pooled as in Ainslie et al. 2023;
    aligned by exact per-head rotations first, Jin et al. 2025; or the best rank-head_dim
    approximation, of the weights (svd) or of their outputs on the calibration text (pca)). With
    --fit (the default), every layer's projections then start there and are fitted by Adam so that
    the new attention's output matches the original's on the calibration text. Prints perplexity of
    the original, the mean-pooled, the merged and the fitted model on a held-out text.
    """
    from ..calibrate import DEFAULT_CHAT, DEFAULT_TEXT, calibrate_attention, calibration_ids, merged_weights
    from ..convert import write_regrouped_gguf
    from ..errors import ModelFileError
    from ..kv_heads import attention_kind, check_kv_heads
    from ..perplexity import DEFAULT_TEXT as DEFAULT_PPL_TEXT
    from ..perplexity import perplexity, read_text, window_ids
    from ..regroup import regroup_model, with_attention_weights

    set_threads(threads)
    loaded = load_model(model, quiet)
    if same_file(loaded.path, output):
        raise ModelFileError(f"the output {output} is the source model; choose another path")
    problem = output_path_problem(output, b"GGUF", "GGUF")
    if problem is not None:  # before minutes of conversion whose result could not be written
        raise OptionError(f"-o {output}: {problem}")
    check_kv_heads(loaded.config.n_heads, loaded.config.n_kv_heads, kv_heads)
    if kv_heads == loaded.config.n_kv_heads:
        raise OptionError(f"{loaded.name} already has {kv_heads} KV head{'s' if kv_heads != 1 else ''}: "
                          "--kv-heads must differ to convert")
    ensure_kernels(quiet)
    c = loaded.config
    say = (lambda text: None) if quiet else (lambda text: stderr.print(text, soft_wrap=True, markup=False))
    timings: dict[str, float] = {}
    reducing = kv_heads < c.n_kv_heads
    needs_text = reducing and (fit or method in ("aligned", "pca"))
    result: dict = {"model": loaded.name, "output": output, "native_kv_heads": c.n_kv_heads, "n_kv_heads": kv_heads,
                    "kv_type": kv_type, "method": method, "fit": bool(fit and reducing)}

    ppl_ids = None
    if not no_eval:
        ppl_path = ppl_text or str(DEFAULT_PPL_TEXT)
        ppl_ids = window_ids(loaded.tokenizer, read_text(ppl_path), ppl_tokens)
        if calibration_text is not None and same_file(ppl_path, calibration_text):
            stderr.print("[yellow]warning: the perplexity text is the calibration text, so it is not held out[/yellow]")
        result["perplexity"] = {"text": ppl_path, "tokens": len(ppl_ids)}
        t = time.perf_counter()
        result["perplexity"]["native"] = perplexity(loaded.model, ppl_ids).perplexity
        result["perplexity"]["mean_pooled"] = perplexity(regroup_model(loaded.model, kv_heads), ppl_ids).perplexity
        timings["eval_seconds"] = time.perf_counter() - t

    text_path = calibration_text or f"{DEFAULT_CHAT} (in the chat template, if the model has one) + {DEFAULT_TEXT}"
    if needs_text or calibration_text is not None:  # a text given is checked even when not needed
        ids = calibration_ids(loaded.tokenizer, calibration_text)

    merged = None  # the merge before any fit, when it differs from the written weights
    if not needs_text:
        t = time.perf_counter()
        layers = merged_weights(loaded.gguf, c, kv_heads, method if reducing else "mean")
        timings["merge_seconds"] = time.perf_counter() - t
    else:
        n_steps = steps if fit else 0
        t0 = time.perf_counter()

        def on_step(layer, step, loss):
            if step % max(1, n_steps // _STEP_REPORTS) == 0 or step == n_steps:
                say(f"layer {layer + 1}/{c.n_layers}  step {step}/{n_steps}  loss {loss:.4f}  "
                    f"({time.perf_counter() - t0:.0f} s)")

        def progress(fit_, seconds):
            done = f" → {fit_.after:.4f} after the fit" if n_steps else ""
            say(f"layer {fit_.layer + 1}/{c.n_layers}: attention rel. error {fit_.before:.4f} after the "
                f"{method} merge{done}  ({seconds:.0f} s)")

        what = f"{method} merge" + (f", then {n_steps} Adam steps per layer on "
                                    f"{', '.join(w[2] for w in fit_weights)} (lr {lr})" if n_steps else "")
        say(f"converting {c.n_layers} layers on {text_path}: {what}")
        cal = calibrate_attention(loaded.model, loaded.gguf, c, kv_heads, ids, method=method, steps=n_steps, lr=lr,
                                  chunk_tokens=chunk_tokens, max_tokens=calib_tokens, fit_weights=fit_weights,
                                  inputs=inputs, minibatch=minibatch, progress=progress, on_step=on_step,
                                  keep_merged=bool(n_steps and ppl_ids is not None and method != "mean"))
        layers = cal.layers
        timings["calibrate_seconds"] = cal.seconds
        result["calibration"] = {"text": text_path, "chunks": cal.tokens[0], "chunk_tokens": cal.tokens[1],
                                 "steps": n_steps, "lr": lr, "minibatch": minibatch,
                                 "fit_weights": list(fit_weights), "inputs": inputs,
                                 "layers": [{"layer": f.layer, "rel_error_merged": f.before,
                                             "rel_error_calibrated": f.after} for f in cal.fits]}
        if n_steps and ppl_ids is not None and method != "mean":
            merged = cal.merged  # the merge each layer's fit started from, for the report

    t = time.perf_counter()
    keep_qo = method == "mean" and not (needs_text and fit and {"w_q", "w_o"} & set(fit_weights))
    written = {i: (w.wk, w.wv) for i, w in layers.items()} if keep_qo or not reducing else layers
    size = write_regrouped_gguf(loaded.path, output, c, kv_heads, written, kv_type)
    timings["write_seconds"] = time.perf_counter() - t
    result["output_bytes"] = size

    if ppl_ids is not None and reducing:
        from ..loading import load

        t = time.perf_counter()
        p = result["perplexity"]
        final = perplexity(load(output).model, ppl_ids).perplexity
        if merged is not None:
            p["merged"] = perplexity(with_attention_weights(loaded.model, merged), ppl_ids).perplexity
        if result["fit"]:
            p["calibrated"] = final
            if method == "mean":
                p["merged"] = p["mean_pooled"]
        else:
            p["merged"] = final
        timings["eval_seconds"] += time.perf_counter() - t
    result["timings"] = timings

    if as_json:
        click.echo(json.dumps(result))
        return
    kind = attention_kind(c.n_heads, kv_heads)
    heads = lambda n: f"{n} KV head{'s' if n != 1 else ''}"  # noqa: E731
    replaced = "attn_k/attn_v" if written is not layers else "attn_q/attn_k/attn_v/attn_output"
    click.echo(f"wrote {output} ({mib(size)}): {replaced} of {c.n_layers} layers as {kv_type}, "
               f"{heads(c.n_kv_heads)} → {heads(kv_heads)}")
    if ppl_ids is not None:
        p = result["perplexity"]
        held = f"; calibrated on {result['calibration']['text']}" if "calibration" in result else ""
        click.echo(f"perplexity on {p['text']} (first {p['tokens']} tokens{held}):")
        rows = [(f"native {c.attention_kind} ({heads(c.n_kv_heads)})", p["native"]),
                (f"mean-pooled {kind} ({heads(kv_heads)})", p["mean_pooled"])]
        if reducing and method != "mean":
            rows.append((f"{method} {kind} ({heads(kv_heads)})", p["merged"]))
        if "calibrated" in p:
            rows.append((f"{method} + fit {kind} ({heads(kv_heads)})", p["calibrated"]))
        for label, value in rows:
            click.echo(f"  {label:<32} {value:>12,.2f}")
    if "calibrate_seconds" in timings:
        cal_info = result["calibration"]
        fitted = f", {cal_info['steps']} steps per layer" if cal_info["steps"] else ""
        click.echo(f"conversion took {timings['calibrate_seconds']:.0f} s "
                   f"({cal_info['chunks']} × {cal_info['chunk_tokens']} tokens{fitted})")
