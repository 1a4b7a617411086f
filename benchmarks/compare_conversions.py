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
merge and the fit; not the evaluation), perplexity on held-out text (one window of
``--eval-tokens`` tokens through :func:`mqa_gen.perplexity.perplexity`), top-1 agreement with the
native model's next-token prediction and the mean KL(native ‖ variant) in nats over the same
window's positions, and greedy agreement on the sample prompts (each rendered with the chat
template, ``--greedy-tokens`` new tokens): the share of native's tokens the variant reproduces
before its first different token, averaged over prompts, and how many prompts it reproduces
entirely. ``--per-layer`` adds, for the best variant, the perplexity with only one layer
converted (the other layers native; the converted layer's single KV head replicated back to the
native count, which is exact), to show which layers lose most.

The calibration text is the shipped ``mqa_gen/data/calibration_english.txt``; the held-out text
is ``mqa_gen/data/eval_english.txt`` when present, otherwise ``sample_prompts/long_document.txt``,
``mqa_gen/data/ppl_english.txt`` and ``benchmarks/data/heldout_english.txt`` joined (none of them
shares a sentence with the calibration text). Prints a table and, unless ``--no-write``, writes
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
EVAL_TEXT = ROOT / "mqa_gen" / "data" / "eval_english.txt"
FALLBACK_EVAL = [ROOT / "sample_prompts" / "long_document.txt", ROOT / "mqa_gen" / "data" / "ppl_english.txt",
                 ROOT / "benchmarks" / "data" / "heldout_english.txt"]
VARIANTS = ["native", "mean", "aligned-mean", "aligned", "aligned+fit", "svd", "svd+fit", "pca", "pca+fit",
            "mean+fit-kv"]


def held_out_text(paths: list[str] | None) -> tuple[str, list[str]]:
    files = [Path(p) for p in paths] if paths else ([EVAL_TEXT] if EVAL_TEXT.exists() else FALLBACK_EVAL)
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files), [str(p.relative_to(ROOT))
                                                                                if p.is_relative_to(ROOT) else str(p)
                                                                                for p in files]


def sample_prompts() -> list[str]:
    """Every sample prompt: each .txt file but the long document, and each prompt of questions.jsonl."""
    folder = ROOT / "sample_prompts"
    prompts = [p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt"))
               if p.name != "long_document.txt"]
    for line in (folder / "questions.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompts.append(json.loads(line)["prompt"])
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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def evaluate(model, eval_ids, native_logp, prompts_ids, native_greedy, stop, n_greedy):
    """Perplexity, top-1 agreement and KL against native, greedy agreement."""
    from mqa_gen.perplexity import perplexity

    ppl = perplexity(model, eval_ids).perplexity
    logits = model.forward(eval_ids, model.new_cache(len(eval_ids)), all_logits=True)
    logp = log_softmax(logits)
    result = {"perplexity": ppl}
    if native_logp is not None:
        p = np.exp(native_logp)
        result["top1_agreement"] = float((logp.argmax(axis=1) == native_logp.argmax(axis=1)).mean())
        result["kl_nats"] = float(np.mean(np.sum(p * (native_logp - logp), axis=1)))
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
    return result, outs


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
        kw = dict(method=method, merge=merge, chunk_tokens=args.chunk_tokens, max_tokens=args.calib_tokens)
        if name == "mean+fit-kv":  # the first calibration's settings (README before this comparison)
            kw.update(steps=40, lr=5e-3, max_tokens=512, fit_weights=("w_k", "w_v"))
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
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--eval-text", action="append", help="held-out text file(s), joined (default: see the doc)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="Adam steps per layer (default: convert's)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--calib-tokens", type=int, default=None)
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--inputs", default=None, choices=["native", "converted"])
    ap.add_argument("--per-layer", type=int, default=0, metavar="TOKENS",
                    help="also: perplexity with one layer converted at a time, over TOKENS tokens (0: skip)")
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
                          ("chunk_tokens", calibrate.DEFAULT_CHUNK_TOKENS), ("inputs", calibrate.DEFAULT_INPUTS)):
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
    eval_ids = tok.encode(text)[: args.eval_tokens]
    calibration = CALIBRATION.read_text(encoding="utf-8")
    for sentence in (s.strip() for s in text.split(".") if len(s.strip()) > 40):
        if sentence in calibration:
            sys.exit(f"error: the held-out text shares a sentence with the calibration text: {sentence[:60]!r}")
    ids = tok.encode(calibration)
    prompts_ids = [tok.encode(render_prompt(tok, [{"role": "user", "content": p}])) for p in sample_prompts()]
    stop = end_of_turn_ids(tok)

    started, load_start = time.time(), loadavg()
    rows, native_logp, native_greedy, cals = {}, None, None, {}
    for name in variants:
        print(f"{name}: building", file=sys.stderr, flush=True)
        model, seconds, cal = build(name, loaded, ids, args)
        if cal is not None:
            cals[name] = cal
        print(f"{name}: built in {seconds:.0f} s; evaluating", file=sys.stderr, flush=True)
        result, outs = evaluate(model, eval_ids, native_logp, prompts_ids, native_greedy, stop, args.greedy_tokens)
        result["build_seconds"] = seconds
        if cal is not None:
            result["layer_rel_error"] = [[f.before, f.after] for f in cal.fits]
        if name == "native":
            native_logp = log_softmax(model.forward(eval_ids, model.new_cache(len(eval_ids)), all_logits=True))
            native_greedy = outs
        rows[name] = result
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'layer_rel_error'})}",
              file=sys.stderr, flush=True)
    load_end = loadavg()
    fitted = [v for v in rows if v in cals]
    best = min(fitted, key=lambda v: rows[v]["perplexity"]) if fitted else None
    layer_ppl = None
    if args.per_layer and best is not None:
        layer_ppl = per_layer(loaded, cals[best], eval_ids, args.per_layer)

    native_ppl = rows["native"]["perplexity"]
    lines = ["| variant | perplexity | × native | top-1 agreement | KL (nats/token) | greedy prefix kept "
             "| greedy identical | build time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if name == "native":
            lines.append(f"| native ({loaded.config.n_kv_heads} KV heads) | {r['perplexity']:.2f} | 1.00 | — | — | — "
                         f"| — | — |")
            continue
        lines.append(f"| {name} | {r['perplexity']:,.2f} | {r['perplexity'] / native_ppl:,.2f} | "
                     f"{r['top1_agreement']:.1%} | {r['kl_nats']:.3f} | {r['greedy_prefix_share']:.1%} | "
                     f"{r['greedy_identical']}/{len(prompts_ids)} | {r['build_seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    layers_md = ""
    if best is not None:
        errs = rows[best]["layer_rel_error"]
        worst = sorted(range(len(errs)), key=lambda i: -errs[i][1])[:5]
        layers_md = (f"\nLayers with the largest attention error after `{best}` (relative MSE of the layer's output on "
                     f"the calibration text, merge → fit): "
                     + ", ".join(f"{i} ({errs[i][0]:.2f} → {errs[i][1]:.2f})" for i in worst) + ".\n")
        if layer_ppl is not None:
            ppls, base = layer_ppl
            order = sorted(range(len(ppls)), key=lambda i: -ppls[i])
            layers_md += (f"\nPerplexity over the first {args.per_layer} held-out tokens with only one layer converted by "
                          f"`{best}` (native: {base:.2f}); the worst: "
                          + ", ".join(f"layer {i} {ppls[i]:.2f}" for i in order[:8])
                          + f"; the best: " + ", ".join(f"layer {i} {ppls[i]:.2f}" for i in order[-3:]) + ".\n")
    command = "python benchmarks/compare_conversions.py " + " ".join(sys.argv[1:])
    body = f"""## Converting to MQA: merge methods compared (`benchmarks/compare_conversions.py`)

{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {platform.machine()}, {os.cpu_count()} CPUs, load average
{load_start[0]:.2f} at the start and {load_end[0]:.2f} at the end; `{command.strip()}`.
Model {loaded.name}, {loaded.config.n_kv_heads} → {args.kv_heads} KV heads. Calibration: `mqa_gen/data/calibration_english.txt`
(first {args.calib_tokens} tokens in chunks of {args.chunk_tokens}); fits: {args.steps} Adam steps per layer at lr {args.lr},
W_q, W_k, W_v, W_o, on the {args.inputs} model's hidden states. Held out: {', '.join(f'`{f}`' for f in eval_files)}, first
{len(eval_ids)} tokens (one window). Greedy: {len(prompts_ids)} sample prompts (chat template), {args.greedy_tokens}
new tokens each. Build time is wall time in this process (reading the calibration text through the model, merging,
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
