"""``mqa-gen generate``: stream text from a prompt (README's Usage section is the contract)."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from ..errors import PromptError
from .common import (
    MAX_PROMPT_BYTES,
    chat_template_option,
    generation_options,
    mib,
    model_option,
    output_path_problem,
    read_chat_template,
    read_limited,
    setup_generation,
    stderr,
    system_prompt_option,
    threads_option,
)


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from ``--prompt``, ``--prompt -`` (stdin) or ``--prompt-file``.

    Raises:
        PromptError: neither or both given, an unreadable file, text that is not UTF-8 (bytes
            on stdin, in the file, or in the argument, which Python passes on as lone surrogates),
            or an empty prompt.
    """
    from ..tokenizer import check_utf8, decode_utf8

    if (prompt is None) == (prompt_file is None):
        raise PromptError("give exactly one of --prompt TEXT, --prompt - (stdin) or --prompt-file PATH")
    if prompt == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:  # a text-only stream (an embedding application's): check what it gives
            text = check_utf8(sys.stdin.read(), "the prompt on stdin")
        else:  # bytes, decoded here: strict, with the position of the first bad byte
            text = decode_utf8(read_limited(stdin, MAX_PROMPT_BYTES, "the prompt on stdin"), "the prompt on stdin")
    elif prompt_file is not None:
        try:
            with open(prompt_file, "rb") as f:
                data = read_limited(f, MAX_PROMPT_BYTES, f"prompt file {prompt_file}")
        except OSError as e:
            raise PromptError(f"cannot read prompt file {prompt_file}: {e.strerror or e}") from None
        text = decode_utf8(data, f"prompt file {prompt_file}")
    else:
        text = check_utf8(prompt, "--prompt")
    if not text.strip():
        raise PromptError("the prompt is empty")
    return text


def build_prompt_ids(loaded, text: str, chat: bool | None, system: str | None = None,
                     template: str | None = None, ctx: int | None = None) -> tuple[list[int], set[int], bool]:
    """Token ids of the prompt, the end-of-generation ids, and whether the chat template was used.

    The template is ``template`` (``--chat-template-file``) or the model's; ``chat`` None uses it
    when there is one. ``system`` (``--system-prompt``) becomes a system message before the user's.
    Generation ends on EOS or any end-of-turn token the vocabulary has (Gemma: ``<eos>`` and
    ``<end_of_turn>``), with or without the template, as llama.cpp's end-of-generation set does.

    Raises:
        PromptError: ``--chat`` without a template; a system prompt or template file with
            ``--no-chat`` (or with no template to put the system prompt in); a text that cannot fit
            ``ctx`` tokens, found before tokenising it (:meth:`~mqa_gen.tokenizer.Tokenizer.surely_longer_than`).
        ChatTemplateError: the template fails to render.
    """
    from ..chat import end_of_turn_ids, render_prompt
    from ..tokenizer import check_utf8

    tok = loaded.tokenizer
    has_template = template is not None or tok.chat_template is not None
    use_chat = has_template if chat is None else chat
    if use_chat:
        if not has_template:
            raise PromptError("--chat: this model has no chat template (give one with --chat-template-file)")
        messages = [{"role": "system", "content": check_utf8(system, "--system-prompt")}] if system is not None else []
        text = render_prompt(tok, messages + [{"role": "user", "content": text}], template)
    elif system is not None:
        raise PromptError("--system-prompt needs the chat template: drop --no-chat"
                          if chat is False else "--system-prompt: this model has no chat template "
                          "(give one with --chat-template-file)")
    elif template is not None:
        raise PromptError("--chat-template-file cannot be used with --no-chat")
    if ctx is not None:
        refuse_if_surely_too_long(tok, text, ctx)
    return tok.encode(text), end_of_turn_ids(tok), use_chat


def refuse_if_surely_too_long(tok, text: str, ctx: int) -> None:
    """A prompt of megabytes is refused at once rather than tokenised first (seconds, gigabytes).

    Raises:
        PromptError: ``text`` cannot be fewer than ``ctx`` tokens.
    """
    if tok.surely_longer_than(text, ctx):
        raise PromptError(f"the prompt ({len(text):,} characters) is longer than the context of {ctx:,} tokens "
                          "(raise --ctx-size or shorten the prompt)")


def print_stats(stats, finish_reason: str | None, load_seconds: float, seed: int | None = None) -> None:
    """One compact block of figures on stderr; the first line ends with the seed used (pass it
    back with ``--seed`` to repeat a sampled run)."""
    s = stats
    heads = "1 KV head, MQA" if s.n_kv_heads == 1 else f"{s.n_kv_heads} KV heads"
    reuse = f" ({s.reused_tokens} reused, {s.prefill_tokens} prefilled)" if s.reused_tokens else ""
    stderr.print(
        f"[bold]prompt[/bold] {s.prompt_tokens} tok{reuse}, {s.prefill_tokens_per_s:,.1f} tok/s  "
        f"[bold]generated[/bold] {s.generated_tokens} tok, {s.decode_tokens_per_s:,.1f} tok/s  "
        f"[bold]finish[/bold] {finish_reason or 'interrupted'}"
        + (f"  [bold]seed[/bold] {seed}" if seed is not None else "") + "\n"
        f"[bold]KV cache[/bold] {mib(s.kv_cache_bytes)} used ({s.kv_bytes_per_token:,} B/token, "
        f"{heads}), {mib(s.kv_cache_capacity_bytes)} reserved  "
        f"[bold]peak RSS[/bold] {mib(s.peak_rss_bytes)}  [bold]load[/bold] {load_seconds:.2f} s",
        soft_wrap=True,  # two lines whatever the width, so scripts can parse stderr
    )


def open_prompt_cache(path: str, loaded, net, ctx: int, cache_dtype: str):
    """``(model identity, cache)`` for ``--prompt-cache path``: the file's cache with capacity
    ``ctx`` tokens, or a new empty one when the file does not exist yet.

    Raises:
        PromptCacheError: the file does not fit this model, --kv-heads or --cache-dtype, is
            truncated or corrupt; or its folder does not exist (checked before generating).
    """
    from ..prompt_cache import PromptCacheError, load_prompt_cache, model_identity

    model_id = model_identity(loaded.gguf)
    if os.path.exists(path):
        cache, _ = load_prompt_cache(path, model_id, config=net.config, dtype=cache_dtype, max_seq_len=ctx)
        return model_id, cache
    problem = output_path_problem(path)
    if problem is not None:
        raise PromptCacheError(f"cannot create prompt cache {path}: {problem}")
    return model_id, net.new_cache(ctx, cache_dtype)


@click.command()
@click.option("-p", "--prompt", default=None, help="Prompt text, or - to read it from stdin.")
@click.option("-f", "--prompt-file", type=click.Path(dir_okay=False), default=None, help="Read the prompt from a file.")
@model_option
@generation_options
@click.option("--chat/--no-chat", default=None, help="Apply the model's chat template (default: on if it has one).")
@system_prompt_option()
@chat_template_option
@click.option("--prompt-cache", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Reuse the KV cache saved in FILE for the prompt's common prefix, then save this run's cache there.")
@click.option("--json", "as_json", is_flag=True, help="No streaming; print one JSON object on stdout.")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None, metavar="N",
              help="With --json: each token's logprob and its N most likely alternatives (OpenAI's shape).")
@click.option("-q", "--quiet", is_flag=True, help="No stats or progress on stderr.")
@threads_option
def generate(prompt, prompt_file, model, chat, system, chat_template_file, prompt_cache, as_json, logprobs, quiet,
             threads, **options):
    """Generate text from a prompt, streaming it to stdout.

    With --prompt-cache FILE, the KV cache and its token ids are kept in FILE: the next run reuses
    the longest common prefix of the cached tokens and its prompt, prefills only the rest, and
    updates FILE. A FILE made by another model, --kv-heads or --cache-dtype is refused (exit 2).

    Without --seed (or with --seed -1) a random seed is drawn and reported on stderr and in --json,
    so a sampled run can be repeated. llama.cpp's spellings work too: -c, -t, -s, --temperature,
    --n-predict, -r/--reverse-prompt, -sys/--system-prompt, --ignore-eos.
    """
    from ..generate import stream_generate
    from ..logprobs import TokenLogprob, openai_logprobs

    if logprobs is not None and not as_json:
        raise PromptError("--logprobs is reported in the --json output: add --json")
    text = read_prompt(prompt, prompt_file)
    template = read_chat_template(chat_template_file)
    setup = setup_generation(model, quiet, threads, **options)
    loaded = setup.loaded
    ids, eos_ids, _ = build_prompt_ids(loaded, text, chat, system, template, ctx=setup.ctx)
    cache = model_id = None
    if prompt_cache is not None:
        t0 = time.perf_counter()
        model_id, cache = open_prompt_cache(prompt_cache, loaded, setup.net, setup.ctx, setup.cache_dtype)
        prompt_cache_seconds = time.perf_counter() - t0
    gen = stream_generate(setup.net, loaded.tokenizer, ids, params=setup.params, max_tokens=setup.max_tokens,
                          stop=setup.stop, eos_ids=eos_ids, ctx_size=setup.ctx, cache_dtype=setup.cache_dtype,
                          cache=cache, top_logprobs=logprobs or 0)

    out = sys.stdout
    interrupted = False
    token_logprobs = []
    try:
        for step in gen:
            if step.finish_reason != "eos":
                token_logprobs.append(TokenLogprob(step.token_id, step.logprob, step.top_logprobs or []))
            if step.text and not as_json:
                out.write(step.text)
                out.flush()
    except KeyboardInterrupt:
        interrupted = True
    if gen.finish_reason == "context" and not quiet:
        stderr.print(f"[yellow]stopped: the context of {gen.cache.max_seq_len} tokens is full "
                     "(raise --ctx-size)[/yellow]")
    if as_json:
        stats = gen.stats.as_dict()
        stats["load_seconds"] = loaded.load_seconds
        if prompt_cache is not None:  # identity digest + reading the file: part of the time to first token
            stats["prompt_cache_seconds"] = prompt_cache_seconds
        completion = len(gen.token_ids)
        result = {"model": loaded.name, "prompt_tokens": len(ids), "token_ids": gen.token_ids,
                  "text": gen.text, "finish_reason": gen.finish_reason or "interrupted",
                  "stop_string": gen.stop_string, "settings": setup.settings(),
                  "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                            "total_tokens": len(ids) + completion},
                  "stats": stats}
        if logprobs is not None:
            result["logprobs"] = openai_logprobs(loaded.tokenizer, token_logprobs)
        json.dump(result, out, ensure_ascii=False)
        out.write("\n")
    elif out.isatty() and gen.text and not gen.text.endswith("\n"):
        out.write("\n")
    out.flush()
    if not quiet:
        print_stats(gen.stats, gen.finish_reason, loaded.load_seconds, setup.params.seed)
    if prompt_cache is not None:  # also after Ctrl-C: the cache is consistent, and the write atomic
        from ..prompt_cache import save_prompt_cache

        size = save_prompt_cache(prompt_cache, gen.cache, model_id, model_name=loaded.config.name)
        if not quiet:
            stderr.print(f"[bold]prompt cache[/bold] {gen.cache.length} tokens saved to {prompt_cache} ({mib(size)})")
    if interrupted:
        sys.exit(130)
