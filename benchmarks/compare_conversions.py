#!/usr/bin/env python3
"""Compare the ways ``mqa-gen convert`` turns a GQA model into fewer KV heads: quality and time.

For one model (SmolLM2-135M-Instruct by default) and one target (``--kv-heads 1``: MQA), every
variant is built in this process, one after another, and measured against the native model:

* native — the file as it is (3 KV heads for SmolLM2);
* mean — each group's K/V heads mean-pooled (Ainslie et al. 2023);
* aligned (mean merge) and aligned — Jin et al. 2025: per-head rotations (one per RoPE pair for
  keys, an orthogonal matrix for values) chosen by Procrustes on the calibration text, then the
  mean, or the mean plus the least-squares refit of the readers (the default ``merge="ls"``);
* svd — the best rank-head_dim approximation of the stacked weights (keys per RoPE pair);
* pca — the same of the projections' outputs on the calibration text, weighted by their readers;
* "+ fit" — the merge, then each layer's W_q, W_k, W_v, W_o fitted by Adam to the original
  layer's output on the calibration text (``--steps``, ``--lr``), layer by layer;
* mean + fit k,v — the first calibration (mean-pooled start, W_k and W_v only, as before this
  comparison existed), for reference.

Measured for each: the wall time to build it (reading the calibration text through the model, the
merge and the fit; not the evaluation), perplexity on held-out text by ``mqa-gen perplexity``'s
method (:func:`mqa_gen.perplexity_chunks.chunked_perplexity`: chunks of ``--ctx`` 512 tokens, each
from an empty KV cache, scored on its second half; ± its standard error), and against the native
model on the same scored positions as ``mqa-gen perplexity --kl-base`` does (the native run's
top-32 distributions; :mod:`mqa_gen.kl_base`): the mean KL(native ‖ variant) in nats and the share
of positions where both put the same token first (top-1 agreement); then greedy agreement on the
sample prompts (each rendered with the chat template, ``--greedy-tokens`` new tokens): the share of native's tokens the variant reproduces
before its first different token, averaged over prompts, and how many prompts it reproduces
entirely. ``--per-layer`` adds, for the best variant, the perplexity with only one layer
converted (the other layers native; the converted layer's single KV head replicated back to the
native count, which is exact), to show which layers lose most. ``--converted NAME=JSON``
evaluates a file ``mqa-gen convert --json`` wrote (timed by that command), ``--add-rows`` puts an
earlier run's rows in the table.

The calibration tokens are ``convert``'s (:func:`mqa_gen.calibrate.calibration_ids`: the shipped
conversations of ``mqa_gen/data/calibration_chat.jsonl`` in the chat template, then
``mqa_gen/data/calibration_english.txt``), or ``--calibrate FILE``; the held-out text is
``mqa_gen/data/eval_english.txt`` (five chunks of 512 SmolLM2 tokens; the script refuses a held-out
text that shares a sentence with the calibration data). Prints a table and, unless ``--no-write``, writes
the ``compare-conversions`` section of BENCHMARKS.md (with the command, the load average and the
machine). Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_section import loadavg, write_section  # noqa: E402

SECTION = "compare-conversions"
CALIBRATION = ROOT / "mqa_gen" / "data" / "calibration_english.txt"
CHAT = ROOT / "mqa_gen" / "data" / "calibration_chat.jsonl"
EVAL_TEXT = ROOT / "mqa_gen" / "data" / "eval_english.txt"
VARIANTS = ["native", "mean", "aligned-mean", "aligned", "aligned+fit", "svd", "svd+fit", "pca", "pca+fit",
            "mean+fit-kv"]
#: The variants run by default: the merges, and a fit from the aligned merge and from the default (pca).
DEFAULT_VARIANTS = ["native", "mean", "aligned", "aligned+fit", "svd", "pca", "pca+fit"]


def held_out_text(paths: list[str] | None) -> tuple[str, list[str]]:
    files = [Path(p) for p in paths] if paths else [EVAL_TEXT]
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files), [str(p.relative_to(ROOT))
                                                                                if p.is_relative_to(ROOT) else str(p)
                                                                                for p in files]


def sample_prompts() -> list[list[dict]]:
    """Every sample prompt as chat messages: each .txt file but the long document as a user turn, and
    each line of questions.jsonl (its ``prompt`` as a user turn, or its ``messages``)."""
    folder = ROOT / "sample_prompts"
    prompts = [[{"role": "user", "content": p.read_text(encoding="utf-8").strip()}]
               for p in sorted(folder.glob("*.txt")) if p.name != "long_document.txt"]
    for line in (folder / "questions.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            prompts.append(row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}])
    return prompts


def greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """n greedy tokens after ids (fewer when an end-of-turn token comes)."""
    cache = model.new_cache(len(ids) + n)
    logits = model.forward(ids, cache)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop or len(out) == n:
            break
        logits = model.forward([token], cache)
    return out


def evaluate(model, plan, native_top, prompts_ids, native_greedy, stop, n_greedy):
    """Chunked perplexity, KL and top-1 agreement against native's top-k, greedy agreement."""
    from mqa_gen.kl_base import DEFAULT_TOP_K
    from mqa_gen.perplexity_chunks import chunked_perplexity

    scored = chunked_perplexity(model, plan, top_k=DEFAULT_TOP_K if native_top is None else 0, base=native_top)
    result = {"perplexity": scored.perplexity, "stderr": scored.stderr}
    if scored.kl is not None:
        result["top1_agreement"] = scored.kl.same_top
        result["kl_nats"] = scored.kl.mean_kl
        result["kl_stderr"] = scored.kl.kl_stderr
    outs = [greedy(model, ids, n_greedy, stop) for ids in prompts_ids]
    if native_greedy is not None:
        shares, same = [], 0
        for ours, ref in zip(outs, native_greedy):
            k = 0
            while k < min(len(ours), len(ref)) and ours[k] == ref[k]:
                k += 1
            shares.append(k / len(ref))
            same += ours == ref
        result["greedy_prefix_share"] = float(np.mean(shares))
        result["greedy_identical"] = int(same)
    return result, outs, scored.top


def build(name, loaded, ids, args):
    """(model, seconds, Calibration or None) for a variant."""
    from mqa_gen.calibrate import calibrate_attention, merged_weights
    from mqa_gen.regroup import with_attention_weights

    c = loaded.config
    t = time.perf_counter()
    cal = None
    base = name.split("+")[0]
    fit = name.endswith("+fit") or name == "mean+fit-kv"
    if name == "native":
        return loaded.model, 0.0, None
    if base in ("mean", "svd") and not fit:
        layers = merged_weights(loaded.gguf, c, args.kv_heads, base)
    else:
        method, merge = ("aligned", "mean") if base == "aligned-mean" else (base, "ls")
        kw = dict(method=method, merge=merge, chunk_tokens=args.chunk_tokens, max_tokens=args.calib_tokens,
                  minibatch=args.minibatch)
        if name == "mean+fit-kv":  # the first calibration's settings (README before this comparison)
            kw.update(steps=40, lr=5e-3, max_tokens=512, fit_weights=("w_k", "w_v"), minibatch=0)
        else:
            kw.update(steps=args.steps if fit else 0, lr=args.lr, inputs=args.inputs)

        def progress(f, seconds):
            print(f"  {name}: layer {f.layer + 1}/{c.n_layers} rel. error {f.before:.4f} → {f.after:.4f} "
                  f"({seconds:.0f} s)", file=sys.stderr, flush=True)

        cal = calibrate_attention(loaded.model, loaded.gguf, c, args.kv_heads, ids, progress=progress, **kw)
        layers = cal.layers
    seconds = time.perf_counter() - t
    return with_attention_weights(loaded.model, layers), seconds, cal


def per_layer(loaded, cal, eval_ids, tokens):
    """Perplexity with only layer ℓ converted (its KV head replicated back to the native count)."""
    from mqa_gen.calibrate import attention_weights
    from mqa_gen.head_merge import merge_heads
    from mqa_gen.perplexity import perplexity
    from mqa_gen.regroup import with_attention_weights

    c = loaded.config
    native = {i: attention_weights(loaded.gguf, c, i) for i in range(c.n_layers)}
    out = []
    for i in range(c.n_layers):
        layers = dict(native)
        layers[i] = merge_heads(cal.layers[i], c.n_kv_heads)  # exact replication of the merged head
        out.append(perplexity(with_attention_weights(loaded.model, layers), eval_ids[:tokens]).perplexity)
        print(f"  only layer {i} converted: {out[-1]:.2f}", file=sys.stderr, flush=True)
    return out, perplexity(with_attention_weights(loaded.model, native), eval_ids[:tokens]).perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--eval-text", action="append", help="held-out text file(s), joined (default: see the doc)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per perplexity chunk")
    ap.add_argument("--calibrate", default=None, help="calibration text (default: convert's)")
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="Adam steps per layer (default: convert's)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--calib-tokens", type=int, default=None)
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--inputs", default=None, choices=["native", "converted"])
    ap.add_argument("--minibatch", type=int, default=None, help="chunks per Adam step (default: convert's)")
    ap.add_argument("--per-layer", type=int, default=0, metavar="TOKENS",
                    help="also: perplexity with one layer converted at a time, over TOKENS tokens (0: skip)")
    ap.add_argument("--converted", action="append", default=[], metavar="NAME=JSON",
                    help="also evaluate the file a `mqa-gen convert --json` run wrote (JSON: its stdout), as "
                         "variant NAME; its build time is that run's conversion time")
    ap.add_argument("--add-rows", action="append", default=[], metavar="JSON",
                    help="put the variants of an earlier run's --json in the table (refused unless its native "
                         "perplexity is this run's: same model, held-out text and --ctx)")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()

    from mqa_gen import calibrate
    from mqa_gen.chat import end_of_turn_ids, render_prompt
    from mqa_gen.kernels import compile_kernels
    from mqa_gen.loading import load

    for name, default in (("steps", calibrate.DEFAULT_STEPS), ("lr", calibrate.DEFAULT_LR),
                          ("calib_tokens", calibrate.DEFAULT_MAX_TOKENS),
                          ("chunk_tokens", calibrate.DEFAULT_CHUNK_TOKENS), ("inputs", calibrate.DEFAULT_INPUTS),
                          ("minibatch", calibrate.DEFAULT_MINIBATCH)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: unknown variant(s) {sorted(unknown)}")
    if "native" not in variants:
        variants.insert(0, "native")
    compile_kernels()
    loaded = load(args.model)
    tok = loaded.tokenizer
    text, eval_files = held_out_text(args.eval_text)
    from mqa_gen.perplexity_chunks import plan_text

    plan = plan_text(tok, text, args.ctx)
    eval_ids = [int(t) for t in plan.chunks.reshape(-1)]  # for --per-layer's one-window perplexity
    calibration = (Path(args.calibrate).read_text(encoding="utf-8") if args.calibrate
                   else CALIBRATION.read_text(encoding="utf-8") + CHAT.read_text(encoding="utf-8"))
    for sentence in (s.strip() for s in text.split(".") if len(s.strip()) > 40):
        if sentence in calibration:
            sys.exit(f"error: the held-out text shares a sentence with the calibration text: {sentence[:60]!r}")
    ids = calibrate.calibration_ids(tok, args.calibrate)
    prompts_ids = [tok.encode(render_prompt(tok, messages)) for messages in sample_prompts()]
    stop = end_of_turn_ids(tok)

    started, load_start = time.time(), loadavg()
    rows, native_top, native_greedy, cals = {}, None, None, {}
    for name in variants:
        print(f"{name}: building", file=sys.stderr, flush=True)
        model, seconds, cal = build(name, loaded, ids, args)
        if cal is not None:
            cals[name] = cal
        print(f"{name}: built in {seconds:.0f} s; evaluating", file=sys.stderr, flush=True)
        result, outs, top = evaluate(model, plan, native_top, prompts_ids, native_greedy, stop, args.greedy_tokens)
        result["build_seconds"] = seconds
        if cal is not None:
            result["layer_rel_error"] = [[f.before, f.after] for f in cal.fits]
        if name == "native":
            native_top, native_greedy = top, outs
        rows[name] = result
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'layer_rel_error'})}",
              file=sys.stderr, flush=True)
    for spec in args.converted:  # files written by `mqa-gen convert`, timed by that command
        name, _, path = spec.partition("=")
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        print(f"{name}: evaluating {report['output']}", file=sys.stderr, flush=True)
        result, _, _ = evaluate(load(report["output"]).model, plan, native_top, prompts_ids, native_greedy, stop,
                                args.greedy_tokens)
        timings = report["timings"]
        result["build_seconds"] = timings.get("calibrate_seconds", timings.get("merge_seconds", 0.0))
        result["convert"] = {k: report[k] for k in ("method", "fit", "calibration") if k in report}
        if "calibration" in report:
            result["layer_rel_error"] = [[f["rel_error_merged"], f["rel_error_calibrated"]]
                                         for f in report["calibration"]["layers"]]
        rows[name] = result
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k not in ('layer_rel_error', 'convert')})}",
              file=sys.stderr, flush=True)
    earlier = set()
    for path in args.add_rows:
        old = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
        if abs(old["native"]["perplexity"] - rows["native"]["perplexity"]) > 1e-9 * rows["native"]["perplexity"]:
            sys.exit(f"error: {path} scored native at {old['native']['perplexity']}, this run at "
                     f"{rows['native']['perplexity']}: not the same model, text or --ctx")
        for name, result in old.items():
            if name != "native" and name not in rows:
                rows[name] = result
                earlier.add(name)
    load_end = loadavg()
    fitted = [v for v in rows if "layer_rel_error" in rows[v] and v.endswith("fit")]
    best = min(fitted, key=lambda v: rows[v]["perplexity"]) if fitted else None
    layer_ppl = None
    if args.per_layer and best in cals:
        layer_ppl = per_layer(loaded, cals[best], eval_ids, args.per_layer)

    native_ppl = rows["native"]["perplexity"]
    lines = ["| variant | perplexity | × native | top-1 agreement | KL (nats/token) | greedy prefix kept "
             "| greedy identical | build time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if name == "native":
            lines.append(f"| native ({loaded.config.n_kv_heads} KV heads) | {r['perplexity']:.2f} ± {r['stderr']:.2f} "
                         f"| 1.00 | — | — | — | — | — |")
            continue
        mark = " †" if name in earlier else ""
        lines.append(f"| {name}{mark} | {r['perplexity']:,.2f} ± {r['stderr']:,.2f} | {r['perplexity'] / native_ppl:,.2f} | "
                     f"{r['top1_agreement']:.1%} | {r['kl_nats']:.3f} | {r['greedy_prefix_share']:.1%} | "
                     f"{r['greedy_identical']}/{len(prompts_ids)} | {r['build_seconds']:.0f} |")
    table = "\n".join(lines)
    if earlier:
        table += ("\n\n† From an earlier run of this script on the same machine (`--add-rows`; its native perplexity "
                  "is this run's to the last digit), where it was built and timed in the same way.")
    if args.converted:
        table += ("\n\n" + ", ".join(f"`{spec.partition('=')[0]}`" for spec in args.converted)
                  + ": the file `mqa-gen convert --json` wrote, evaluated here; build time = that command's "
                  "conversion time (`timings.calibrate_seconds`).")
    print(table)
    layers_md = ""
    if best is not None:
        errs = rows[best]["layer_rel_error"]
        worst = sorted(range(len(errs)), key=lambda i: -errs[i][1])[:5]
        layers_md = (f"\nPer layer, `{best}`: relative MSE of the layer's output on the calibration text after the "
                     f"merge → after the fit (on the {args.inputs} model's states), layers 0 … {len(errs) - 1}:\n\n"
                     + " · ".join(f"{i}: {e[0]:.3f} → {e[1]:.3f}" for i, e in enumerate(errs))
                     + "\n\nThe largest after the fit: " + ", ".join(f"layer {i} ({errs[i][1]:.3f})" for i in worst)
                     + ".\n")
        if layer_ppl is not None:
            ppls, base = layer_ppl
            order = sorted(range(len(ppls)), key=lambda i: -ppls[i])
            layers_md += (f"\nPerplexity over the first {args.per_layer} held-out tokens with only one layer converted by "
                          f"`{best}` (native: {base:.2f}); the worst: "
                          + ", ".join(f"layer {i} {ppls[i]:.2f}" for i in order[:8])
                          + f"; the best: " + ", ".join(f"layer {i} {ppls[i]:.2f}" for i in order[-3:]) + ".\n")
    command = "python benchmarks/compare_conversions.py " + " ".join(sys.argv[1:])
    calib_what = (f"`{args.calibrate}`" if args.calibrate else
                  "`mqa_gen/data/calibration_chat.jsonl` (chat template) then `mqa_gen/data/calibration_english.txt`")
    batch_what = f", {args.minibatch} chunks per step" if args.minibatch else ", every chunk each step"
    body = f"""## Converting to MQA: merge methods compared (`benchmarks/compare_conversions.py`)

{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {platform.machine()}, {os.cpu_count()} CPUs, load average
{load_start[0]:.2f} at the start and {load_end[0]:.2f} at the end; `{command.strip()}`.
Model {loaded.name}, {loaded.config.n_kv_heads} → {args.kv_heads} KV heads. Calibration: {calib_what}, {len(ids):,}
tokens, the first {args.calib_tokens:,} used in chunks of {args.chunk_tokens}; fits: {args.steps} Adam steps per layer at
lr {args.lr}{batch_what}, W_q, W_k, W_v, W_o, on the {args.inputs} model's hidden states. Held out:
{', '.join(f'`{f}`' for f in eval_files)}, scored as `mqa-gen perplexity FILE --ctx {args.ctx}` does: {plan.n_chunks} chunks of
{args.ctx} tokens, {plan.n_scored:,} scored; perplexity ± its standard error; KL and top-1 agreement against the native
model's top-32 distributions on the same positions (as `--kl-base`). Greedy: {len(prompts_ids)} sample prompts (chat
template), {args.greedy_tokens} new tokens each: "prefix kept" is the share of native's tokens reproduced before the first
difference. Build time is wall time in this process (reading the calibration text through the model, merging,
fitting), one variant after another on the same machine.

{table}
{layers_md}"""
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "layer_ppl": layer_ppl}, indent=1), encoding="utf-8")
    if not args.no_write:
        write_section(Path(args.output), SECTION, body)
        print(f"wrote the {SECTION} section of {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
