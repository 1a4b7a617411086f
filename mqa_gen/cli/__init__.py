"""The ``mqa-gen`` command: a thin Click layer over the library, one module per verb.

Error contract: input errors (:class:`~mqa_gen.errors.MqaGenError`) print ``error: <one line>`` on
stderr and exit 2; other failures exit 1 with one line (set ``MQA_GEN_DEBUG=1`` for the
traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import MqaGenError
from .generate import generate
from .info import info


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mqa-gen")
def cli() -> None:
    """Generate text with Multi-Query Attention and measure what the KV cache costs."""


cli.add_command(generate)
cli.add_command(info)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, mapping errors to one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="mqa-gen", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except MqaGenError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): exit quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("MQA_GEN_DEBUG"):
            raise
        message = str(e).strip().splitlines()
        click.echo(f"error: {type(e).__name__}: {message[0] if message else ''}", err=True)
        sys.exit(1)
