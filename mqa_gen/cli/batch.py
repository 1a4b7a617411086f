"""``mqa-gen batch``: generate for many prompts in one process, with continuous batching.

Input lines are checked before the model runs (:mod:`mqa_gen.batch_input`); the prompts then go
through one :class:`~mqa_gen.scheduler.Scheduler`, ``--batch-size`` of them decoding together,
and every result is written as one JSON line as soon as it (and, unless ``--unordered``, every
line before it) is finished, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import click

from ..batch_output import error_line, result_line
from ..errors import MqaGenError
from .common import (
    MAX_BATCH_INPUT_BYTES,
    RANDOM_SEED,
    chat_template_option,
    generation_options,
    mib,
    model_option,
    output_path_problem,
    read_chat_template,
    same_file,
    read_limited,
    setup_generation,
    stderr,
    threads_option,
)


#: ``--ray``'s value when no ADDRESS follows it.
LOCAL_RAY = ""


class BatchRunError(MqaGenError):
    """A batch run that cannot start: its output, its memory budget or its flags."""


def read_input_lines(path: str) -> list[bytes]:
    """The input's lines as bytes (``-`` = stdin).

    Raises:
        BatchRunError: the file cannot be read.
    """
    if path == "-":
        return read_limited(sys.stdin.buffer, MAX_BATCH_INPUT_BYTES, "the input on stdin").splitlines()
    try:
        with open(path, "rb") as f:
            return read_limited(f, MAX_BATCH_INPUT_BYTES, path).splitlines()
    except OSError as e:
        raise BatchRunError(f"cannot read {path}: {e.strerror or e}") from None


def result_key(obj_id) -> tuple[str, object]:
    """An id as a set key: 1 and "1" are different ids."""
    return type(obj_id).__name__, obj_id


def ids_in_output(path: str) -> set:
    """Ids of the results already in ``path`` (for ``--resume``). A last line cut short by a killed
    run, and the error lines of ``--skip-bad``, are dropped from the file (atomically), so those
    prompts run again.

    Raises:
        BatchRunError: a line that is not a JSON object with an ``id``.
    """
    from ..atomic_file import atomic_write

    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] and not _is_json_object(lines[-1]):  # an unfinished last line
        lines = lines[:-1]
    ids, kept = set(), []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = result_key(obj["id"])
        except (ValueError, TypeError, KeyError):
            raise BatchRunError(f"--resume: line {number} of {path} is not a result line of mqa-gen batch") from None
        if "error" not in obj:
            ids.add(key)
            kept.append(line)
    if b"".join(line + b"\n" for line in kept) != data:  # a line dropped (or the last one cut short)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
    return ids


def reorder_output(path: str, input_keys: list) -> None:
    """Rewrite ``path`` with its lines in input order (after a resumed run appended the rest)."""
    from ..atomic_file import atomic_write

    position = {key: i for i, key in enumerate(input_keys)}
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    lines.sort(key=lambda line: position.get(result_key(json.loads(line)["id"]), len(position)))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class ResultWriter:
    """Writes result lines to ``out``: in input order (each line once every line before it is done)
    or, ``unordered``, as they finish. Flushes each line, so a line written is never lost."""

    def __init__(self, out, ordered: bool):
        self.out, self.ordered = out, ordered
        self.waiting: dict[int, dict] = {}
        self.next = 0
        self.written = 0

    def add(self, position: int, obj: dict) -> None:
        """The result at ``position`` (0-based, among the lines this run writes)."""
        if not self.ordered:
            self._write(obj)
            return
        self.waiting[position] = obj
        while self.next in self.waiting:
            self._write(self.waiting.pop(self.next))
            self.next += 1

    def flush_all(self) -> None:
        """Write every finished line still held for ordering (after an interruption)."""
        for position in sorted(self.waiting):
            self._write(self.waiting.pop(position))

    def _write(self, obj: dict) -> None:
        try:
            self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            self.out.flush()
        except BrokenPipeError:
            raise  # the reader of stdout left: exit 141
        except OSError as e:  # a full disk, a device that refuses writes: the lines so far are kept
            raise BatchRunError(f"cannot write the results ({e.strerror or e}); {self.written} lines were "
                                "written before it: fix it and run again with --resume") from None
        self.written += 1


def kv_budget_batch(net, ctx: int, cache_dtype: str, batch_size: int, budget_mib: float | None, quiet: bool,
                    actors: int = 1) -> int:
    """Sequences that run together: ``batch_size``, capped by what fits in the KV budget
    (``--kv-budget`` MiB, default 90 % of the memory available now, the model already loaded).
    Says on stderr how many sequences of ``ctx`` tokens fit, as vLLM does.

    ``actors`` > 1 (``--ray``): the budget is each actor's; by default 90 % of this machine's
    available memory shared among them, as if they all ran here (a local runtime does).

    Raises:
        BatchRunError: not even one sequence fits.
    """
    from ..cache import available_memory_bytes, kv_bytes, kv_bytes_per_token
    from ..scheduler import kv_fit

    c = net.config
    per_sequence = kv_bytes(ctx, c.layer_windows, c.n_kv_heads, c.head_dim, cache_dtype)
    if budget_mib is not None:
        budget = budget_mib * 2**20
    else:
        available = available_memory_bytes()
        budget = 0.9 * available / actors if available is not None else batch_size * per_sequence
    fit = kv_fit(per_sequence, budget)
    per_token = kv_bytes_per_token(c.n_layers, c.n_kv_heads, c.head_dim, cache_dtype)
    if fit < 1:
        raise BatchRunError(f"one sequence of {ctx} tokens needs {mib(per_sequence)} of KV cache, more than the "
                            f"budget of {mib(budget)} (lower --ctx-size, or raise --kv-budget)")
    if not quiet:
        each = " per actor" if actors > 1 else ""
        stderr.print(f"{fit:,} sequences of {ctx:,} tokens fit in {mib(budget)} of KV cache{each} "
                     f"({per_token:,} B/token, {c.n_kv_heads} KV heads); batch size {min(batch_size, fit)}")
    return min(batch_size, fit)


def build_requests(items, loaded, setup, chat: bool | None, logprobs: int | None, template: str | None = None):
    """Each :class:`~mqa_gen.batch_input.BatchItem` as a :class:`~mqa_gen.scheduler.Request` (whose
    ``id`` is its position in the list), or a :class:`~mqa_gen.batch_input.BadLine` when its
    settings or prompt cannot run.

    A line's seed is its own, else ``--seed``; a line with neither (or with -1) gets its own seed
    drawn at random (:func:`~mqa_gen.sampling.draw_seed`), reported in its output line, so any
    line can be repeated. ``template``: ``--chat-template-file`` (None = the model's)."""
    from dataclasses import replace

    from ..batch_input import BadLine, BatchItem
    from ..chat import end_of_turn_ids, render_prompt
    from ..errors import SamplingError
    from ..sampling import draw_seed
    from ..scheduler import Request
    from .generate import build_prompt_ids, refuse_if_surely_too_long

    tok = loaded.tokenizer
    eos = frozenset(end_of_turn_ids(tok))
    out = []
    for item in items:
        if not isinstance(item, BatchItem):
            out.append(item)
            continue
        s = item.settings
        try:
            params = replace(setup.params, **{k: s[k] for k in ("temperature", "top_k", "top_p", "min_p", "seed")
                                              if k in s})
            if params.seed is None or params.seed == RANDOM_SEED:
                params = replace(params, seed=draw_seed())
            params.validate()
            if item.messages is not None:
                rendered = render_prompt(tok, item.messages, template)
                refuse_if_surely_too_long(tok, rendered, setup.ctx)
                ids = tok.encode(rendered)
            else:
                ids, _, _ = build_prompt_ids(loaded, item.prompt, chat, template=template, ctx=setup.ctx)
            if len(ids) >= setup.ctx:
                raise MqaGenError(f"the prompt has {len(ids)} tokens but the context is {setup.ctx} tokens "
                                  "(raise --ctx-size or shorten the prompt)")
        except (SamplingError, MqaGenError) as e:
            out.append(BadLine(item.line, item.id, str(e)))
            continue
        stop = s.get("stop", list(setup.stop))
        out.append(Request(ids, params, s.get("max_tokens", setup.max_tokens),
                           tuple([stop] if isinstance(stop, str) else stop), eos,
                           s.get("logprobs", logprobs), id=len(out)))
    return out


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", default="-", metavar="OUTPUT", help="Write the JSONL results here (default: stdout).")
@model_option
@generation_options
@click.option("--chat/--no-chat", default=None, help="Apply the model's chat template to prompt lines "
              "(default: on if it has one; messages lines always use it).")
@chat_template_option
@click.option("--format", "input_format", type=click.Choice(["jsonl", "text"]), default=None,
              help="INPUT's format (default: text for a .txt file, else jsonl).")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most sequences decoding together (slots).")
@click.option("--kv-budget", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MIB",
              help="KV-cache memory for all sequences together (default: 90% of the memory available).")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None, metavar="N",
              help="Add each token's logprob and its N most likely alternatives.")
@click.option("--unordered", is_flag=True, help="Write results as they finish, not in input order.")
@click.option("--resume", is_flag=True, help="Skip the ids already in OUTPUT and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--skip-bad", is_flag=True, help="Write an error object for a bad line and go on (default: stop).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or stats on stderr.")
@threads_option
@click.option("--ray", "ray_address", is_flag=False, flag_value=LOCAL_RAY, default=None, metavar="[ADDRESS]",
              help="Run the prompts on a Ray cluster (needs mqa-gen[ray]): ADDRESS (auto, HOST:PORT, "
                   "ray://HOST:PORT) joins it; without one, join the cluster `ray start` runs here, else start "
                   "a local runtime for this run.")
@click.option("--actors", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --ray: actors, each with the model loaded (default: the cluster's CPUs / "
                   "--threads-per-actor).")
@click.option("--threads-per-actor", type=click.IntRange(min=1), default=None, metavar="T",
              help="With --ray: each actor's kernel threads and CPUs (default 1).")
def batch(input_path, output, model, chat, chat_template_file, input_format, batch_size, kv_budget, logprobs,
          unordered, resume, overwrite, skip_bad, quiet, threads, ray_address, actors, threads_per_actor, **options):
    """Generate for every prompt of INPUT (JSONL or text, - = stdin), many at once.

    JSONL lines: {"prompt": ...} or {"messages": [...]}, optionally with id, max_tokens,
    temperature, top_k, top_p, min_p, seed, stop, logprobs; the flags give the defaults. Each
    output line: id, prompt_tokens, token_ids, text, finish_reason, seed (and logprobs). Each
    result equals `mqa-gen generate` on that prompt alone with the same settings. A line without
    a seed (and no --seed, or --seed -1) gets its own random seed, reported in its output line.
    With --ray the prompts run on a pool of Ray actors and the output is the same.
    """
    from ..batch_input import BadLine, read_items

    to_file = output != "-"
    if kv_budget is not None and not math.isfinite(kv_budget):
        raise BatchRunError(f"--kv-budget must be a finite size in MiB, got {kv_budget}")
    problem = output_path_problem(output) if to_file else None
    if problem is not None:
        raise BatchRunError(f"-o {output}: {problem}")
    if resume and not to_file:
        raise BatchRunError("--resume needs -o OUTPUT (the file to continue)")
    if resume and overwrite:
        raise BatchRunError("--resume continues OUTPUT and --overwrite replaces it: pass one of them")
    if to_file and input_path != "-" and same_file(input_path, output):
        raise BatchRunError(f"-o {output} is the input file: the results would replace the prompts; "
                            "write them to another file")
    if to_file and os.path.exists(output) and not (resume or overwrite):
        raise BatchRunError(f"{output} exists: pass --resume to continue it or --overwrite to replace it")
    on_ray = _ray_run(ray_address, actors, threads_per_actor, threads, quiet)
    text_format = input_format == "text" or (input_format is None and input_path.endswith(".txt"))
    all_items = read_items(read_input_lines(input_path), text_format)
    input_keys = [result_key(it.id) for it in all_items]
    done_ids = ids_in_output(output) if resume else set()
    if done_ids - set(input_keys):
        raise BatchRunError(f"--resume: {output} holds {len(done_ids - set(input_keys))} ids that {input_path} "
                            "does not have: is it the output of another input?")
    items = [it for it in all_items if result_key(it.id) not in done_ids]
    if not items and not done_ids:
        raise BatchRunError(f"{input_path} holds no prompts")
    if resume and not items:
        reorder_output(output, input_keys)
        if not quiet:
            stderr.print(f"nothing to do: every prompt of {input_path} has its result in {output}")
        return
    _refuse_bad_lines(items, skip_bad)
    template = read_chat_template(chat_template_file)

    setup = setup_generation(model, quiet, threads, draw_seed=False, **options)
    work = build_requests(items, setup.loaded, setup, chat, logprobs, template)
    _refuse_bad_lines(work, skip_bad)
    requests = [w for w in work if not isinstance(w, BadLine)]
    try:
        if on_ray is not None:
            on_ray.connect()
            if not quiet:
                stderr.print(f"Ray: {on_ray.describe()} on {on_ray.where()} ({on_ray.cluster_cpus} CPUs)",
                             soft_wrap=True)
        slots = kv_budget_batch(setup.net, setup.ctx, setup.cache_dtype, batch_size, kv_budget, quiet,
                                actors=on_ray.actors if on_ray is not None else 1)
        slots = max(1, min(slots, len(requests)))
        _run_and_write(setup, model, options, items, work, requests, slots, output, resume, unordered, input_keys,
                       quiet, on_ray)
    finally:
        if on_ray is not None:
            on_ray.close()


def _ray_run(ray_address, actors, threads_per_actor, threads, quiet):
    """The :class:`~mqa_gen.cli.batch_ray.RayBatch` of a ``--ray`` run (Ray imported, nothing started
    yet), or None without ``--ray``.

    Raises:
        BatchRunError: ``--actors`` or ``--threads-per-actor`` without ``--ray``, or ``-t`` with it.
        RayBatchError: Ray is not installed.
    """
    if ray_address is None:
        for flag, value in (("--actors", actors), ("--threads-per-actor", threads_per_actor)):
            if value is not None:
                raise BatchRunError(f"{flag} needs --ray")
        return None
    if threads is not None:
        raise BatchRunError("-t/--threads sets this process's threads; with --ray give --threads-per-actor")
    from .batch_ray import RayBatch

    return RayBatch(None if ray_address == LOCAL_RAY else ray_address, actors, threads_per_actor or 1, quiet)


def _run_and_write(setup, model, options, items, work, requests, slots, output, resume, unordered, input_keys, quiet,
                   on_ray) -> None:
    """Run the requests — in this process, or on Ray (``on_ray``, a connected
    :class:`~mqa_gen.cli.batch_ray.RayBatch`) — and write each line as it comes; Ctrl-C keeps the
    lines finished (exit 130)."""
    from ..batch_input import BadLine
    from ..scheduler import Scheduler

    to_file = output != "-"
    out = open(output, "a" if resume else "w", encoding="utf-8") if to_file else sys.stdout
    writer = ResultWriter(out, ordered=not unordered)
    for position, w in enumerate(work):
        if isinstance(w, BadLine):
            writer.add(position, error_line(w))
    t0 = time.perf_counter()
    interrupted = False
    try:
        if on_ray is None:
            scheduler = Scheduler(setup.net, setup.loaded.tokenizer, batch_size=slots, ctx_size=setup.ctx,
                                  cache_dtype=setup.cache_dtype)
            with _progress(quiet, len(requests)) as progress:
                for completion in scheduler.run(requests, on_step=progress and progress.update):
                    position = completion.request.id
                    writer.add(position, result_line(completion, items[position].id, setup.loaded.tokenizer))
        else:
            from .batch_ray import RayBatchError

            with _progress(quiet, len(requests)) as progress:
                results = on_ray.results([(r, items[r.id].id) for r in requests], model=model, options=options,
                                         slots=slots)
                try:
                    for done, (position, obj) in enumerate(results, start=1):
                        writer.add(position, obj)
                        if progress is not None:
                            speed = on_ray.stats.generated_tokens / (time.perf_counter() - t0)
                            progress.show(done, speed, f"{on_ray.actors} actors")
                except RayBatchError as e:
                    keep = f" (the {writer.written} lines written are kept: run again with --resume)" if to_file else ""
                    raise RayBatchError(f"{e}{keep}") from None
    except KeyboardInterrupt:
        interrupted = True
        writer.flush_all()
    finally:
        if to_file:
            try:
                out.close()
            except OSError:  # already reported by the failed write
                pass
    wall = time.perf_counter() - t0
    if resume and not unordered and not interrupted:
        reorder_output(output, input_keys)  # the earlier run's lines and this run's, in input order
    if not quiet:
        where = output if to_file else "stdout"
        if on_ray is None:
            _print_stats(scheduler, wall, writer.written, len(work), where, interrupted)
        else:
            _print_ray_stats(on_ray, wall, writer.written, len(work), where, interrupted)
    if interrupted:
        sys.exit(130)


def _refuse_bad_lines(items, skip_bad: bool) -> None:
    """Without ``--skip-bad``, the first bad line stops the run before any work."""
    from ..batch_input import BadLine, BatchInputError

    bad = [it for it in items if isinstance(it, BadLine)]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad lines; --skip-bad writes an error object for each)" if len(bad) > 1 else ""
        raise BatchInputError(f"line {bad[0].line}: {bad[0].message}{more}")


class _progress:
    """A rich progress bar on stderr (prompts done / total, tokens/s, active slots or actors); the
    context gives the bar (:meth:`update` from a scheduler, :meth:`show` from anything), or None
    when quiet."""

    def __init__(self, quiet: bool, total: int):
        self.quiet, self.total = quiet, total
        self.last = 0.0

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("prompts"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[speed]} tok/s  {task.fields[note]}"),
                            TimeElapsedColumn(), console=stderr, transient=False)
        self.task = self.bar.add_task("batch", total=self.total, speed="-", note="")
        self.t0 = time.perf_counter()
        self.bar.__enter__()
        return self

    def update(self, scheduler) -> None:
        """A scheduler's state after a step (its ``on_step``): decode tok/s, active slots."""
        s = scheduler.stats
        self.show(s.finished, s.decode_rows / s.decode_seconds if s.decode_seconds else 0.0,
                  f"{scheduler.active} active")

    def show(self, finished: int, speed: float, note: str) -> None:
        """Prompts finished, tokens/s, and a note (at most 5 redraws a second, and the last one)."""
        now = time.perf_counter()
        if now - self.last < 0.2 and finished < self.total:
            return
        self.last = now
        self.bar.update(self.task, completed=finished, speed=f"{speed:,.1f}", note=note)

    def __exit__(self, *exc):
        if not self.quiet:
            self.bar.__exit__(*exc)
        return False


def _print_stats(scheduler, wall: float, written: int, total: int, where: str, interrupted: bool) -> None:
    s = scheduler.stats
    decode = s.decode_rows / s.decode_seconds if s.decode_seconds else 0.0
    stderr.print(
        f"[bold]batch[/bold] {s.finished} prompts, {s.prompt_tokens:,} prompt + {s.generated_tokens:,} generated "
        f"tokens in {wall:.1f} s: {s.generated_tokens / wall if wall else 0:,.1f} tok/s overall, {decode:,.1f} tok/s "
        f"in decode steps (mean batch {s.mean_batch:.1f} of {scheduler.batch_size})",
        soft_wrap=True,
    )
    if interrupted:
        _print_interrupted(written, total, where)


def _print_ray_stats(on_ray, wall: float, written: int, total: int, where: str, interrupted: bool) -> None:
    """The totals of a ``--ray`` run, and what its start-up cost (the figures of README's estimate
    for N nodes: tokens/s per busy actor, an actor's model load, the runtime's start)."""
    s = on_ray.stats
    first = f"{s.first_result_seconds:.1f} s" if s.first_result_seconds is not None else "-"
    stderr.print(
        f"[bold]batch[/bold] {s.prompts} prompts on Ray, {s.prompt_tokens:,} prompt + "
        f"{s.generated_tokens:,} generated tokens in {wall:.1f} s: {s.generated_tokens / wall if wall else 0:,.1f} "
        f"tok/s overall, {s.tokens_per_actor_second:,.1f} tok/s per busy actor ({on_ray.describe()}; {len(s.tasks)} tasks on {len(s.actors)} actor processes); runtime ready in {s.connect_seconds:.1f} s, first "
        f"results after {first}, model loaded in {s.mean_load_seconds:.1f} s per actor",
        soft_wrap=True,
    )
    if interrupted:
        _print_interrupted(written, total, where)


def _print_interrupted(written: int, total: int, where: str) -> None:
    stderr.print(f"[yellow]interrupted: {written} of {total} lines written to {where}; "
                 "run again with --resume to finish[/yellow]")
