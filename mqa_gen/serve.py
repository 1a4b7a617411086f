"""An OpenAI-compatible HTTP API over the batched :class:`~mqa_gen.engine.Engine` (Starlette).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (a JSON answer, or with
``"stream": true`` server-sent events ``data: {chunk}`` ending in ``data: [DONE]``),
``GET /v1/models`` and ``GET /health``. Request fields follow OpenAI's API, plus llama-server's
``top_k``, ``min_p`` and ``repeat_penalty``; an unset field takes the server's flag. Answers follow
OpenAI's shapes (``usage``; finish reason ``stop`` for an end of text or a stop string, ``length``
for ``max_tokens`` or a full context) and carry an ``mqa_gen`` object with the request's KV-cache
facts.

Every bad request gets a 4xx with OpenAI's error object ``{"error": {"message", "type", "param",
"code"}}``; an unexpected failure a 500 with the same object (never a traceback), and the server
goes on. Each request is logged as one line on stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from dataclasses import dataclass, replace

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .cache import kv_bytes, kv_bytes_per_token
from .chat import render_prompt, role_problem
from .engine import Engine, EngineBusy, Event
from .errors import MqaGenError, SamplingError
from .logprobs import openai_logprobs
from .sampling import draw_seed
from .scheduler import Request

#: Largest request body accepted, bytes (a prompt of the whole context is far smaller).
MAX_BODY_BYTES = 1 << 20

#: OpenAI request fields this server does not implement, with the one value it accepts (the default).
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": "", "presence_penalty": 0, "frequency_penalty": 0,
               "logit_bias": {}, "tools": [], "response_format": {"type": "text"}}

#: Our finish reasons → OpenAI's.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    """A request refused with ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error",
                   headers=None) -> JSONResponse:
    """OpenAI's error object as a JSON response."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body generator as soon as the response ends.

    When the client goes away, Starlette stops iterating the generator where it waits at a ``yield``
    and leaves it suspended; its ``finally`` (which frees the request's slot) would run only when the
    garbage collector finds it, maybe never while the server is idle. ``aclose`` runs it now.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@dataclass
class ServerConfig:
    """What the app needs besides the engine.

    Attributes:
        setup: the :class:`~mqa_gen.cli.common.GenerationSetup` (model, defaults, context).
        model_id: the name ``/v1/models`` lists; aliases: other names a request may give.
        eos_ids: end-of-generation ids. template: a chat template instead of the model's (or None).
        api_key: the key ``Authorization: Bearer`` must carry (None = no check).
        max_tokens_limit: the largest ``max_tokens`` a request may ask (default: the context).
    """

    setup: object
    model_id: str
    aliases: frozenset[str]
    eos_ids: frozenset[int]
    template: str | None = None
    api_key: str | None = None
    max_tokens_limit: int | None = None


def log_line(method: str, path: str, status: int, usage: tuple[int, int] | None, ms: float) -> None:
    """One line per request on stderr: method, path, status, prompt/completion tokens, ms."""
    tokens = f" prompt={usage[0]} completion={usage[1]}" if usage else ""
    print(f"{method} {path} {status}{tokens} {ms:.0f}ms", file=sys.stderr, flush=True)


class AccessLog:
    """ASGI middleware: after each HTTP request, :func:`log_line` with the status sent and the
    token counts the handler left in ``scope["state"]["usage"]``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        scope.setdefault("state", {})
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log_line(scope["method"], scope["path"], status[0], scope["state"].get("usage"),
                     (time.perf_counter() - t0) * 1000)


def create_app(engine: Engine, config: ServerConfig) -> Starlette:
    """The Starlette app serving ``engine``'s model (see the module docstring)."""
    setup = config.setup
    tokenizer = setup.loaded.tokenizer
    c = setup.net.config
    per_token = kv_bytes_per_token(c.n_layers, c.n_kv_heads, c.head_dim, setup.cache_dtype)
    limit = config.max_tokens_limit or setup.ctx

    def check_key(request: HTTPRequest) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")

    async def read_json(request: HTTPRequest) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return obj

    def field(body: dict, name: str, types, default=None, check=None, what: str = ""):
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            value = "bool"  # bool is an int in Python: refuse it where a number is asked
        if not isinstance(value, types) or (check is not None and not check(value)):
            raise APIError(400, f"'{name}' must be {what}, got {json.dumps(body.get(name))[:80]}", param=name)
        return value

    def build_request(body: dict, prompt_ids: list[int], chat: bool) -> tuple[Request, dict]:
        model = field(body, "model", str, what="a string")
        if model is not None and model not in config.aliases:
            raise APIError(404, f"the model '{model}' does not exist (this server has '{config.model_id}')",
                           param="model", code="model_not_found")
        for name, default in UNSUPPORTED.items():  # refused rather than silently ignored
            if name in body and body[name] not in (None, default) and not (default == 0 and body[name] == 0.0):
                raise APIError(400, f"'{name}' is not supported by this server (only {json.dumps(default)})",
                               param=name, code="unsupported_parameter")
        number = (int, float)
        p = setup.params
        params = replace(
            p,
            temperature=float(field(body, "temperature", number, p.temperature, what="a number")),
            top_p=float(field(body, "top_p", number, p.top_p, what="a number")),
            top_k=field(body, "top_k", int, p.top_k, what="an integer"),
            min_p=float(field(body, "min_p", number, p.min_p, what="a number")),
            repetition_penalty=float(field(body, "repeat_penalty", number, p.repetition_penalty, what="a number")),
            seed=field(body, "seed", int, None, lambda v: v >= -1, "an integer >= 0"),
        )
        if params.seed is None or params.seed == -1:
            params = replace(params, seed=p.seed if p.seed is not None and "seed" not in body else draw_seed())
        try:
            params.validate()
        except SamplingError as e:
            name = {"repetition_penalty": "repeat_penalty"}.get(e.field, e.field)
            raise APIError(400, f"'{name}' {e.reason}", param=name) from None
        max_tokens = field(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", int,
                           setup.max_tokens, lambda v: 0 < v <= limit or v == -1,
                           f"an integer from 1 to {limit} (or -1: until the context is full)")
        stop = field(body, "stop", (str, list), list(setup.stop),
                     lambda v: (isinstance(v, str) and v) or (isinstance(v, list) and len(v) <= 16
                                                              and all(isinstance(s, str) and s for s in v)),
                     "a non-empty string or a list of up to 16 non-empty strings")
        stop = [stop] if isinstance(stop, str) else stop
        if chat:
            wants = field(body, "logprobs", bool, False, what="true or false")
            top = field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
            logprobs = top if wants else None
        else:
            logprobs = field(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
        stream = field(body, "stream", bool, False, what="true or false")
        if len(prompt_ids) >= setup.ctx:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens but the context is {setup.ctx} tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        eos = frozenset() if setup.ignore_eos else config.eos_ids
        return Request(prompt_ids, params, max_tokens, tuple(stop), eos, logprobs), {"stream": stream}

    def completion_prompt(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < c.vocab_size for t in prompt):
                raise APIError(400, f"'prompt' holds a token id outside 0..{c.vocab_size - 1}", param="prompt")
            return list(prompt)
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       param="prompt")

    def chat_prompt(body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message must be an object with a 'role'", param="messages")
            problem = role_problem(m["role"])
            if problem is not None:
                raise APIError(400, problem, param="messages")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI's content parts: only text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, "each message's 'content' must be a string", param="messages")
            clean.append({"role": m["role"], "content": content})
        try:
            return tokenizer.encode(render_prompt(tokenizer, clean, config.template))
        except MqaGenError as e:
            raise APIError(400, str(e), param="messages") from None

    def extension(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"kv_bytes_per_token": per_token, "n_kv_heads": c.n_kv_heads,
                "kv_cache_bytes": kv_bytes(prompt_tokens + completion_tokens, c.layer_windows, c.n_kv_heads,
                                           c.head_dim, setup.cache_dtype)}

    def legacy_logprobs(entries) -> dict:
        """The completions API's logprobs shape: tokens, token_logprobs, top_logprobs, text_offset."""
        content = openai_logprobs(tokenizer, entries)["content"]
        return {"tokens": [e["token"] for e in content], "token_logprobs": [e["logprob"] for e in content],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in content],
                "text_offset": None}

    async def run(http: HTTPRequest, chat: bool) -> Response:
        check_key(http)
        body = await read_json(http)
        prompt_ids = chat_prompt(body) if chat else completion_prompt(body)
        request, opts = build_request(body, prompt_ids, chat)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = engine.submit(request, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except EngineBusy as e:
            raise APIError(503, f"the server is busy ({e}); try again", code="server_busy", kind="server_error",
                           headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        n_prompt = len(prompt_ids)
        http.scope["state"]["usage"] = (n_prompt, 0)

        def usage(n: int) -> dict:
            return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}

        if opts["stream"]:
            return ClosingStreamingResponse(stream_events(http, handle, queue, chat, rid, created, usage, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            checked = time.monotonic()
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    ev = None
                # every half second, whether tokens arrive or not (while they do, no timeout fires)
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        engine.cancel(handle)
                        return Response(status_code=499)
                if ev is None:
                    continue
                if ev.kind == "error":
                    raise APIError(500, f"generation failed: {ev.message}", kind="server_error")
                if ev.kind == "done":
                    break
        except asyncio.CancelledError:
            engine.cancel(handle)
            raise
        done = ev.completion
        n = len(done.token_ids)
        http.scope["state"]["usage"] = (n_prompt, n)
        reason = FINISH_REASONS[done.finish_reason]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": reason,
                      "logprobs": openai_logprobs(tokenizer, done.logprobs) if done.logprobs is not None else None}
        else:
            choice = {"index": 0, "text": done.text, "finish_reason": reason,
                      "logprobs": legacy_logprobs(done.logprobs) if done.logprobs is not None else None}
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": config.model_id,
                             "choices": [choice],
                             "usage": {**usage(n), "prompt_tokens_details": {"cached_tokens": done.reused_tokens}},
                             "mqa_gen": {**extension(n_prompt, n), "seed": request.params.seed,
                                         "finish_reason": done.finish_reason, "reused_tokens": done.reused_tokens}})

    async def stream_events(http, handle, queue, chat, rid, created, usage, body):
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        n = 0

        def chunk(piece: str | None, reason: str | None, logprob=None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason,
                          "logprobs": openai_logprobs(tokenizer, [logprob]) if logprob is not None else None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": reason,
                          "logprobs": legacy_logprobs([logprob]) if logprob is not None else None}
            data = {"id": rid, "object": obj, "created": created, "model": config.model_id, "choices": [choice]}
            if reason is not None:
                data["mqa_gen"] = extension(usage(n)["prompt_tokens"], n)
                if include_usage:
                    data["usage"] = usage(n)
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                ev = await queue.get()
                if ev.kind == "error":
                    err = {"error": {"message": f"generation failed: {ev.message}", "type": "server_error",
                                     "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if ev.kind == "done":
                    n = len(ev.completion.token_ids)
                    break
                step = ev.step
                if step.finish_reason != "eos":
                    n += 1
                reason = FINISH_REASONS[step.finish_reason] if step.finish_reason else None
                if step.text or reason or ev.logprob is not None:
                    yield chunk(step.text, reason, ev.logprob)
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(handle)  # a client that left: its slot is freed before the next step
            http.scope["state"]["usage"] = (usage(n)["prompt_tokens"], n)  # the log line: tokens sent or generated

    async def completions(http: HTTPRequest) -> Response:
        return await run(http, chat=False)

    async def chat_completions(http: HTTPRequest) -> Response:
        return await run(http, chat=True)

    async def models(http: HTTPRequest) -> Response:
        check_key(http)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_id, "object": "model", "created": 0, "owned_by": "mqa-gen",
             "meta": {"n_ctx": setup.ctx, "n_kv_heads": c.n_kv_heads, "kv_bytes_per_token": per_token,
                      "n_vocab": c.vocab_size}}]})

    async def health(http: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "slots": engine.scheduler.batch_size,
                             "slots_busy": engine.scheduler.busy_slots, "waiting": engine.waiting})

    async def on_api_error(http, exc: APIError) -> Response:
        return exc.response()

    async def on_http_error(http, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no such endpoint: {http.method} {http.url.path}" if exc.status_code in (404, 405) else exc.detail
        return error_response(exc.status_code, message, kind=kind, headers=getattr(exc, "headers", None))

    async def on_error(http, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/completions", completions, methods=["POST"]),
              Route("/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                                        Exception: on_error})
    app.add_middleware(AccessLog)
    return app
