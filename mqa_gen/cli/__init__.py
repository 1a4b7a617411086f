"""The ``mqa-gen`` command: a thin Click layer over the library, one module per verb.

Error contract (the same under ``click.testing.CliRunner`` as from the shell): input errors
(:class:`~mqa_gen.errors.MqaGenError`) and Click's own usage errors (an unknown option, a value of
the wrong type or range, a missing argument) print ``error: <one line>`` on stderr and exit 2;
other failures (bugs) print one line and exit 1 (``-v``/``--verbose``, before or after the verb,
or ``MQA_GEN_DEBUG=1`` shows the traceback); Ctrl-C exits 130; a closed stdout (``| head``) ends
quietly with exit 141, as a process killed by SIGPIPE reports in a shell.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from ..errors import MqaGenError

#: Each verb's module, imported only when the verb runs (or ``--help`` lists it): ``generate``
#: should not pay for importing what ``chat``, ``convert`` and ``bench-cache`` need.
COMMANDS = {
    "generate": "generate",
    "batch": "batch",
    "chat": "chat",
    "convert": "convert",
    "info": "info",
    "bench-cache": "bench_cache",
    "perplexity": "perplexity",
    "list": "list_models",
    "serve": "serve",
}

#: Exit code when the reader of stdout went away: 128 + SIGPIPE, what a shell reports for a
#: process that SIGPIPE killed (Python ignores SIGPIPE, so we see EPIPE and exit with it).
EXIT_BROKEN_PIPE = 141

#: ``ctx.meta`` key (shared by a context and all its children) set by ``-v``/``--verbose``.
VERBOSE = "mqa_gen.verbose"


class OneLineError(click.ClickException):
    """A failure shown as ``error: <message>`` on stderr with a chosen exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def usage_error_line(e: click.UsageError) -> str:
    """Click's usage error as one line, in our style: ``no such option: --frobnicate (try
    'mqa-gen generate --help')``. Click's own display is the usage block, a hint line and
    ``Error: …``; ours is one line like every other error."""
    text = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip()).rstrip(".")
    first = text.split(" ", 1)[0]
    if not first.isupper():  # "No such option" → "no such option"; an acronym stays
        text = text[:1].lower() + text[1:]
    if e.ctx is not None and e.ctx.command.get_help_option(e.ctx) is not None:
        text += f" (try '{e.ctx.command_path} --help')"
    return text


def _set_verbose(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta[VERBOSE] = True


def verbose_option() -> click.Option:
    """``-v/--verbose``: show the traceback of a bug (exit 1) instead of its one line. Added to the
    group and to every verb, so ``mqa-gen -v generate …`` and ``mqa-gen generate … -v`` both work."""
    return click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_verbose, help="Show the traceback of an unexpected failure (a bug).")


def _quiet_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null, so the interpreter's final
    flush of what is still buffered does not fail again (Python's documented recipe for EPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (CliRunner)
        pass


class App(click.Group):
    """Click group that maps every failure to the exit-code contract above — library errors,
    Click's usage errors, bugs, Ctrl-C and a closed stdout, for every verb in one place — and
    imports each verb's module on first use (:data:`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"{__name__}.{module}"), module)
        if not any(p.name == "verbose" for p in command.params):
            command.params.append(verbose_option())
        return command

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        # The group's own parsing: `mqa-gen --frobnicate`, or `mqa-gen --help | head -1`.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # plain `mqa-gen`: Click prints the help, as it should
        except click.UsageError as e:
            raise OneLineError(usage_error_line(e), 2) from None
        except BrokenPipeError:
            _quiet_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MqaGenError as e:
            raise OneLineError(str(e), e.exit_code) from None
        except click.UsageError as e:  # a verb's unknown option, bad value, missing argument
            raise OneLineError(usage_error_line(e), 2) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:  # the reader of stdout left (`| head`): leave quietly, as Unix tools do
            _quiet_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None
        except Exception as e:  # noqa: BLE001 - the contract is one line, never a traceback
            if ctx.meta.get(VERBOSE) or os.environ.get("MQA_GEN_DEBUG"):
                raise
            lines = str(e).strip().splitlines()
            raise OneLineError(f"{type(e).__name__}: {lines[0] if lines else 'unexpected failure'}", 1) from None


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mqa-gen")
@click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
              help="Show the traceback of an unexpected failure (a bug); also accepted after the verb.")
def cli() -> None:
    """Generate text with Multi-Query Attention and measure what the KV cache costs."""


def main() -> None:
    """Console-script entry point: :func:`cli`, then one last flush of stdout, whose failure
    (the reader left after the last write) also ends in exit 141 rather than a traceback."""
    if sys.stdout is None:  # the shell closed it (`>&-`): nothing can be delivered, as for a reader gone
        sys.exit(EXIT_BROKEN_PIPE)
    for name, mode in (("stdin", "r"), ("stderr", "w")):  # `<&-`, `2>&-`: an empty input, a silent stderr
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))
    try:
        cli.main(prog_name="mqa-gen")
        code = 0
    except SystemExit as e:
        code = e.code
    try:
        if sys.stdout is not None:  # None when the shell closed it (`>&-`)
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        code = EXIT_BROKEN_PIPE
    _exit_now(code)


def _exit_now(code) -> None:
    """End the process with ``code`` without the interpreter's teardown where nothing needs it.

    Tearing down a process that loaded Numba kernels (modules, LLVM's JIT, hundreds of imported
    modules) takes 0.15 s after the last token is out — 15 % of a fresh ``generate -n 1`` (issue 15,
    ``benchmarks/bench_startup.py``). Every file we write is closed (and atomically renamed) before
    this point, so only stderr is left to flush. A process that started Ray keeps the normal exit:
    Ray's own exit handlers stop what it started. A non-integer code (``sys.exit("message")``) keeps
    Python's handling of it too.
    """
    if "ray" in sys.modules or not (code is None or isinstance(code, int)):
        sys.exit(code)
    for stream in (sys.stderr, sys.stdout):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or gone: nothing left to deliver
            pass
    os._exit(code or 0)
