"""The ``mqa-gen`` command: a thin Click layer over the library, one module per verb.

Error contract (the same under ``click.testing.CliRunner`` as from the shell): input errors
(:class:`~mqa_gen.errors.MqaGenError`) print ``error: <one line>`` on stderr and exit 2; other
failures print one line and exit 1 (``MQA_GEN_DEBUG=1`` shows the traceback); Ctrl-C exits 130.
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
}


class OneLineError(click.ClickException):
    """A failure shown as ``error: <message>`` on stderr with a chosen exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class App(click.Group):
    """Click group that maps library errors to the exit-code contract above and imports each
    verb's module on first use (:data:`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        return getattr(importlib.import_module(f"{__name__}.{module}"), module)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MqaGenError as e:
            raise OneLineError(str(e), e.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:
            raise  # the reader of stdout left (`| head`): main() exits quietly
        except Exception as e:  # noqa: BLE001 - the contract is one line, never a traceback
            if os.environ.get("MQA_GEN_DEBUG"):
                raise
            lines = str(e).strip().splitlines()
            raise OneLineError(f"{type(e).__name__}: {lines[0] if lines else 'unexpected failure'}", 1) from None


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mqa-gen")
def cli() -> None:
    """Generate text with Multi-Query Attention and measure what the KV cache costs."""


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="mqa-gen")
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): leave quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
