"""``mqa-gen serve``: an OpenAI-compatible HTTP server on the batched engine (:mod:`mqa_gen.serve`).

Needs the optional extra ``mqa-gen[serve]`` (Starlette and uvicorn); without it the verb says how
to install it and exits 2.
"""

from __future__ import annotations

import os

import click

from ..errors import MqaGenError
from .common import (
    chat_template_option,
    generation_options,
    model_option,
    read_chat_template,
    setup_generation,
    stderr,
    threads_option,
)


class ServeError(MqaGenError):
    """A server that cannot start: a missing extra, a port in use, a bad flag."""


def _require_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeError("mqa-gen serve needs Starlette and uvicorn: pip install 'mqa-gen[serve]'") from None


@click.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 = every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("-b", "--batch-size", "-np", "--parallel", "batch_size", type=click.IntRange(min=1), default=4,
              show_default=True, help="Slots: most requests decoding together.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Most requests waiting for a slot; beyond it, 503 with Retry-After.")
@click.option("--api-key", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (default: the MQA_GEN_API_KEY variable, else no key).")
@click.option("--alias", "-a", default=None, metavar="NAME",
              help="The model name /v1/models lists and requests use (default: the -m value).")
@click.option("--cache-prompt/--no-cache-prompt", default=True, show_default=True,
              help="Reuse the longest prefix a free slot's cache shares with a new prompt (llama-server's "
                   "cache_prompt): a shared system prompt or a growing conversation is prefilled once; logits "
                   "may then differ from a fresh prefill by float32 rounding, as with --prompt-cache.")
@generation_options
@chat_template_option
@click.option("-q", "--quiet", is_flag=True, help="No load messages on stderr (request lines still go there).")
@threads_option
def serve(model, host, port, batch_size, max_queue, api_key, alias, cache_prompt, chat_template_file, quiet, threads,
          **options):
    """Serve the model over an OpenAI-compatible HTTP API.

    POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with "stream": true),
    GET /v1/models and /health. The generation flags are the defaults of every request; a request's
    own fields (max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop, logprobs)
    override them. Concurrent requests share decode steps (continuous batching, --batch-size slots).
    """
    _require_extra()
    import socket

    import numba
    import uvicorn

    from ..chat import end_of_turn_ids
    from ..engine import Engine
    from ..scheduler import Scheduler
    from ..serve import ServerConfig, create_app

    api_key = api_key or os.environ.get("MQA_GEN_API_KEY") or None
    template = read_chat_template(chat_template_file)
    # refuse a port in use before loading the model
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    setup = setup_generation(model, quiet, threads, draw_seed=False, **options)
    tok = setup.loaded.tokenizer
    if template is None and tok.chat_template is None and not quiet:
        stderr.print("[yellow]warning: this model has no chat template: /v1/chat/completions will refuse "
                     "requests (give one with --chat-template-file)[/yellow]")
    scheduler = Scheduler(setup.net, tok, batch_size=batch_size, ctx_size=setup.ctx, cache_dtype=setup.cache_dtype,
                          reuse_prefix=cache_prompt)
    engine = Engine(scheduler, max_queue=max_queue, threads=numba.get_num_threads())
    model_id = alias or model
    aliases = {model_id, model, os.path.basename(setup.loaded.path), setup.loaded.name}
    config = ServerConfig(setup, model_id, frozenset(aliases), frozenset(end_of_turn_ids(tok)), template, api_key)
    app = create_app(engine, config)
    engine.start()
    if not quiet:
        slots = f"{batch_size} slot{'s' if batch_size != 1 else ''}"
        stderr.print(f"serving {model_id} on http://{host}:{port}/v1 ({slots} of {setup.ctx:,} tokens"
                     f"{', API key required' if api_key else ''})", soft_wrap=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        engine.stop()
