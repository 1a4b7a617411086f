"""``mqa-gen serve`` as a real server process on 127.0.0.1, through the official ``openai`` client.

Greedy results are checked against ``mqa-gen generate --json`` on the same prompt (a separate
process, no server code), concurrent requests against the same requests sent alone, and every bad
request against OpenAI's error object, with the server still answering afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
CTX = 256
PROMPT = "The capital of France is"
COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"  # greedy, it goes on counting past 200 tokens (no early EOS)
CHAT = [{"role": "user", "content": "Name three colours."}]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
MQA_GEN = [sys.executable, "-c", "from mqa_gen.cli import main; main()"]


class Reply:
    """A raw HTTP answer: status, headers (lower-case names), text."""

    def __init__(self, status: int, headers: dict, text: str):
        self.status_code, self.headers, self.text = status, headers, text

    def json(self):
        return json.loads(self.text)


def call(base: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 60) -> Reply:
    """One HTTP request with the standard library (independent of the client under test)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode())
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log: Path, *flags: str):
    """``mqa-gen serve`` on a free port of 127.0.0.1 with ``flags``; yields its base URL once
    /health answers; always terminated."""
    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen(MQA_GEN + ["serve", "--port", str(port), "-c", str(CTX), "-q", *flags],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            try:
                if call(base, "GET", "/health", timeout=2).status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start in 90 s"
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with 4 slots and an API key."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with running_server(log, "-b", "4", "--api-key", KEY, "--max-queue", "8") as base:
        yield base, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=60, max_retries=0)


def generate_json(*args: str) -> dict:
    """``mqa-gen generate --json`` in its own process: the reference for the server's answers."""
    out = subprocess.run(MQA_GEN + ["generate", "--json", "-q", "-c", str(CTX), *args], capture_output=True,
                         text=True, env=ENV, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def reference():
    """Greedy 24-token results of generate for the raw prompt and for the chat."""
    raw = generate_json("--no-chat", "-n", "24", "-p", PROMPT)
    chat = generate_json("--chat", "-n", "24", "-p", CHAT[0]["content"])
    return raw, chat


def test_completion_equals_generate(client, reference):
    raw, _ = reference
    r = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == raw["text"]
    assert r.choices[0].finish_reason == {"length": "length", "eos": "stop"}[raw["finish_reason"]]
    assert r.usage.prompt_tokens == raw["prompt_tokens"]
    assert r.usage.completion_tokens == len(raw["token_ids"])
    assert r.usage.total_tokens == raw["prompt_tokens"] + len(raw["token_ids"])
    ext = r.model_extra["mqa_gen"]
    assert ext["n_kv_heads"] == raw["stats"]["n_kv_heads"]
    assert ext["kv_bytes_per_token"] == raw["stats"]["kv_bytes_per_token"]


def test_chat_equals_generate(client, reference):
    _, chat = reference
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == chat["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == chat["prompt_tokens"]
    assert r.usage.completion_tokens == len(chat["token_ids"])


def test_streaming_joins_to_the_same_text(client, server, reference):
    raw, chat = reference
    pieces = [c.choices[0].text for c in client.completions.create(prompt=PROMPT, max_tokens=24, temperature=0,
                                                                   model="smollm2-135m-instruct", stream=True)]
    assert "".join(pieces) == raw["text"]
    chunks = list(client.chat.completions.create(messages=CHAT, max_tokens=24, temperature=0, stream=True,
                                                 model="smollm2-135m-instruct",
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat["text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(chat["token_ids"])
    # the raw event stream: data lines, the last one [DONE]
    resp = call(server[0], "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "stream": True},
                {"Authorization": f"Bearer {KEY}"})
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in resp.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_concurrent_requests_equal_their_solo_results(client):
    prompts = ["Once upon a time", "The best way to learn", "Water boils at"]
    solo = [client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=16, temperature=0)
            .choices[0].text for p in prompts]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = client.completions.create(model="smollm2-135m-instruct", prompt=prompts[i], max_tokens=16,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(3)] == solo


def test_stop_string_ends_the_text(client, reference):
    raw, _ = reference
    stop = raw["text"][6:10]  # a string the greedy text holds, past its start
    cut = raw["text"][: raw["text"].index(stop)]
    r = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=24, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_shapes(client):
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy: the best one was chosen
    c = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_seeded_sampling_repeats(client):
    def ask(seed):
        return client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text
    assert ask(7) == ask(7)


def test_models_lists_the_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m-instruct"]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": PROMPT, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": PROMPT, "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": PROMPT, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": PROMPT, "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "word " * (CTX + 10)}).encode(), 400, "prompt"),
    (json.dumps({"prompt": PROMPT, "model": "gpt-4"}).encode(), 404, "model"),
    (json.dumps({"prompt": PROMPT, "n": 2}).encode(), 400, "n"),
    (json.dumps({"prompt": PROMPT, "stop": ""}).encode(), 400, "stop"),
    (json.dumps({"prompt": PROMPT, "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x" * (10 * 2**20)}).encode(), 413, None),
])
def test_bad_request_gets_an_error_object_and_the_server_goes_on(server, body, status, param):
    base, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = call(base, "POST", "/v1/completions", body, headers)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in r.text
    ok = call(base, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, headers)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_message_with_an_unknown_role_is_400(server):
    base, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = {"messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 2}
    r = call(base, "POST", "/v1/chat/completions", body, headers)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and "unknown message role 'wizard'" in error["message"]


def test_api_key_is_required(server):
    base, _ = server
    body = {"prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = call(base, "POST", "/v1/completions", body, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert call(base, "GET", "/health").status_code == 200  # health needs no key


def test_unknown_endpoint_is_404(server):
    base, _ = server
    r = call(base, "GET", "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_one_log_line_per_request(server):
    base, log = server
    call(base, "GET", "/health")
    lines = [line for line in log.read_text().splitlines() if line.startswith("POST /v1/completions 200")]
    assert lines and all(" prompt=" in line and " completion=" in line and line.endswith("ms") for line in lines)


def test_without_the_extra_serve_says_how_to_install_it(tmp_path):
    for name in ("starlette", "uvicorn"):  # packages that fail to import, first on the path
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run(MQA_GEN + ["serve"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: mqa-gen serve needs Starlette and uvicorn: "
                                               "pip install 'mqa-gen[serve]'"]


def send_counting(base: str, stream: bool) -> http.client.HTTPConnection:
    """A request that keeps generating for 200 tokens, sent on a connection the test then drops."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": COUNTING, "max_tokens": 200, "stream": stream, "stop": [], "repeat_penalty": 1.0,
                       "temperature": 0, "seed": 1})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return conn


def leave(conn: http.client.HTTPConnection) -> None:
    conn.sock.close()  # the client goes away
    conn.close()


def log_line_once_freed(base: str, log: Path, logged: int) -> str:
    """Wait (bounded) until no slot is busy and the request's access-log line is written; return it."""
    def its_lines():
        return [line for line in log.read_text().splitlines()[logged:] if line.startswith("POST /v1/completions")]

    deadline = time.monotonic() + 300  # a bound on waiting on a loaded machine, not a timing assertion
    while (call(base, "GET", "/health").json()["slots_busy"] or not its_lines()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert call(base, "GET", "/health").json()["slots_busy"] == 0
    [line] = its_lines()
    return line


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    base, log = server
    logged = len(log.read_text().splitlines())
    conn = send_counting(base, stream=True)
    assert conn.getresponse().readline().startswith(b"data: ")  # it is generating
    leave(conn)
    line = log_line_once_freed(base, log, logged)
    # the request ended because its client left, not because it ran out of tokens to generate
    assert int(re.search(r" completion=(\d+) ", line).group(1)) < 200
    r = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_a_client_that_leaves_before_its_answer_frees_its_slot(server):
    """Not streaming: tokens keep arriving while the client is gone, and the request must still be
    dropped (log status 499) rather than generate all its tokens."""
    base, log = server
    logged = len(log.read_text().splitlines())
    conn = send_counting(base, stream=False)
    deadline = time.monotonic() + 60
    while not call(base, "GET", "/health").json()["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)  # until it is generating
    leave(conn)
    assert log_line_once_freed(base, log, logged).startswith("POST /v1/completions 499 ")


def test_beyond_the_queue_a_request_gets_503_with_retry_after(tmp_path):
    with running_server(tmp_path / "stderr.txt", "-b", "1", "--max-queue", "0") as base:
        conn = send_counting(base, stream=True)  # (its key is not checked: this server has none)
        assert conn.getresponse().readline().startswith(b"data: ")  # the one slot is taken
        busy = call(base, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        conn.close()
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert set(busy.json()["error"]) == {"message", "type", "param", "code"}


def test_a_repeated_prompt_reuses_its_cached_prefix(client, reference):
    """cache_prompt (on by default): a prompt whose tokens a free slot's cache still holds is not
    prefilled again — all but its last token come from the cache — and greedy text is unchanged."""
    _, chat = reference
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.model_extra["mqa_gen"]["reused_tokens"] == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content == chat["text"][: len(
        first.choices[0].message.content)]
